r"""The whole Seed Diffusion training chain in one command, each stage in its own workdir.

    python -m sdiff_jax.chain --config=configs/quickstart.py --workdir=/tmp/sdiff_chain

Stages (WORKDIR/<name>; each starts from the previous one's model):

1. `pretrain`: the config's own curriculum (mask, then mask + edit; the quickstart
   begins with AR steps), `train.num_steps` steps.
2. `pool`: trajectories of the pre-trained model from training-document prefixes
   (`chain.pool_*`: prompts, prompt and generation lengths, steps per block, samples),
   the best `chain.keep` per prompt selected by their own evidence bound
   (`sdiff_jax.trajectories`).
3. `distill`: constrained-order distillation on the selection, from `pretrain`,
   `chain.distill_steps` steps (the `distill` section of the config).
4. `onpolicy`: on-policy step reduction from `distill`, `chain.onpolicy_steps` steps
   (the `onpolicy` section; `sdiff_jax.onpolicy`).

Stages 3 and 4 train at `chain.learning_rate` with `chain.warmup_steps`. Rerunning the
command resumes: finished stages are skipped, an interrupted one continues from its
checkpoint. At the end each stage's model is evaluated (`chain.eval_prompts` > 0) at
`chain.eval_steps_per_block` and the on-policy sampler's steps per block, each with and
without its threshold: held-out ELBO and, on the task testbed (`data.source="tasks"`),
pass@1 of `chain.eval_tasks` tasks per split (test, combos) with the completions'
unigram entropy and tokens per forward, plotted in WORKDIR/chain.png (pass@1 against
tokens per forward, a line per stage); on other corpora the validity parse rate (real
function bodies have ~4.9 bits of entropy; repetition parses). `chain.ar_workdir` adds
a causal model (the same-budget AR baseline) as stage "ar". A table goes to stdout, the
rows to WORKDIR/chain.json. Each model's rows are kept in WORKDIR/eval/<stage>.json with
its checkpoint step and the evaluation's options: a rerun reuses them while both match.
"""

import dataclasses
import json
import os
import sys
from typing import Any, Callable

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from sdiff_jax import checkpointing, config_lib, sharding, train, trajectories
from sdiff_jax.data import tasks as tasks_lib
from sdiff_jax.evaluate import run as evaluate_lib

TRAINED = ("pretrain", "distill", "onpolicy")


def stage_configs(
  config: ml_collections.ConfigDict, root: str
) -> dict[str, ml_collections.ConfigDict]:
  """The training config of each trained stage (see the module docstring)."""
  c = config.chain
  pretrain = ml_collections.ConfigDict(config.to_dict())
  pretrain.distill.pool, pretrain.onpolicy.enabled = "", False
  finetune = dict(learning_rate=c.learning_rate, warmup_steps=c.warmup_steps)
  distill = ml_collections.ConfigDict(pretrain.to_dict())
  distill.distill.pool = os.path.join(root, "pool")
  distill.train.update(
    init_from=os.path.join(root, "pretrain"), num_steps=c.distill_steps, **finetune
  )
  onpolicy = ml_collections.ConfigDict(pretrain.to_dict())
  onpolicy.onpolicy.enabled = True
  onpolicy.train.update(
    init_from=os.path.join(root, "distill"), num_steps=c.onpolicy_steps, **finetune
  )
  for stage in (pretrain, distill, onpolicy):
    config_lib.validate(stage)
  return {"pretrain": pretrain, "distill": distill, "onpolicy": onpolicy}


def _pool_options(config: ml_collections.ConfigDict) -> trajectories.PoolOptions:
  c = config.chain
  return trajectories.PoolOptions(
    num_prompts=c.pool_prompts,
    prompt_len=c.pool_prompt_len,
    max_new_tokens=c.pool_max_new_tokens,
    steps_per_block=tuple(c.pool_steps_per_block),
    samples=c.pool_samples,
  )


def run(
  config: ml_collections.ConfigDict, root: str, log: Callable[[str], None] = print
) -> list[dict[str, Any]]:
  """Runs (or resumes) every stage under `root`; the evaluation rows (empty when
  `chain.eval_prompts` is 0 or a stage was preempted)."""
  if config.attention == "causal":
    raise ValueError("the chain trains a diffusion model: attention must not be 'causal'")
  configs = stage_configs(config, root)
  if config.chain.ar_workdir:  # a clear error now, not after the training
    checkpointing.Workdir(config.chain.ar_workdir).read_config()
  for number, name in enumerate(("pretrain", "pool", "distill", "onpolicy"), 1):
    log(f"===== stage {number}/4: {name} ({os.path.join(root, name)})")
    if name == "pool":
      out = os.path.join(root, "pool")
      trajectories.build_pool(os.path.join(root, "pretrain"), out, _pool_options(config), log=log)
      sharding.barrier("every process wrote its trajectories")  # process 0 selects from all
      if jax.process_index() == 0:
        report = trajectories.write_selection(out, config.chain.keep)
        log(
          f"selected {report['kept']['count']} of {report['kept']['count'] + report['dropped']['count']} trajectories"
        )
      sharding.barrier("process 0 wrote the selection")  # which distill reads
      continue
    result = train.train_and_evaluate(configs[name], os.path.join(root, name))
    if result.preempted:
      log(f"stage {name} was interrupted: rerun the same command to resume")
      return []
  if config.chain.eval_prompts <= 0:
    return []
  rows = evaluate_stages(config, root, log)
  if jax.process_index() == 0:
    with open(os.path.join(root, "chain.json"), "w") as f:
      json.dump(rows, f, indent=1)
    log(table(rows))
    if any(r["suite"] == "tasks" for r in rows):
      plot_tasks(rows, os.path.join(root, "chain.png"), log)
  return rows


def evaluate_stages(
  config: ml_collections.ConfigDict, root: str, log: Callable[[str], None] = print
) -> list[dict[str, Any]]:
  """Each trained stage's evaluation rows (`stage` added), and the AR baseline's
  (`chain.ar_workdir`, stage "ar") where one is named. On the task corpus: held-out ELBO
  and the tasks suite (pass@1 on test and combos); otherwise held-out ELBO and validity.
  Settings: `chain.eval_steps_per_block` and the on-policy sampler's steps per block, each
  with and without the on-policy sampler's threshold."""
  c, o = config.chain, config.onpolicy
  on_tasks = tasks_lib.is_source(config.data.source) and c.eval_tasks > 0
  steps = sorted({*c.eval_steps_per_block, o.steps_per_block})
  options = evaluate_lib.Options(
    suites=("nelbo", "tasks") if on_tasks else ("nelbo", "validity"),
    num_prompts=c.eval_prompts,
    heldout_rows=c.eval_heldout_rows,
    max_new_tokens=o.max_new_tokens,
    grid={"steps_per_block": steps, "threshold": (None, o.threshold)},
    tasks={"num": c.eval_tasks, "max_new_tokens": o.max_new_tokens},
  )
  stages = {name: os.path.join(root, name) for name in TRAINED}
  if c.ar_workdir:
    stages = {"ar": c.ar_workdir, **stages}
  rows = []
  for name, workdir in stages.items():
    rows += [{"stage": name, **r} for r in _evaluate_once(name, workdir, options, root, log)]
  return rows


def _evaluate_once(
  name: str, workdir: str, options: evaluate_lib.Options, root: str, log: Callable[[str], None]
) -> list[dict[str, Any]]:
  """`workdir`'s evaluation rows, read from ROOT/eval/<name>.json when that file holds the
  same checkpoint step and options (a rerun of the chain evaluates nothing twice)."""
  path = os.path.join(root, "eval", f"{name}.json")
  key = {
    "workdir": os.path.abspath(workdir),
    "step": checkpointing.latest_step(checkpointing.Workdir(workdir)),
    "options": json.loads(json.dumps(dataclasses.asdict(options))),
  }
  if os.path.exists(path):
    with open(path) as f:
      kept = json.load(f)
    if {k: kept.get(k) for k in key} == key:
      log(f"===== {name}: evaluated before (step {key['step']}), rows from {path}")
      return kept["rows"]
  log(f"===== evaluating {name}")
  rows = evaluate_lib.evaluate(workdir, options, step=key["step"])
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump({**key, "rows": rows}, f, indent=1)
    os.replace(path + ".tmp", path)
  return rows


def plot_tasks(rows: list[dict[str, Any]], path: str, log: Callable[[str], None] = print) -> None:
  """chain.png: tasks pass@1 against tokens per forward, one panel per split, one line per
  stage through its fixed-step settings (hollow markers: with the threshold), the AR
  baseline as one point."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    log("matplotlib is not installed: no chain.png (pip install matplotlib)")
    return
  mine = [r for r in rows if r["suite"] == "tasks" and r["metric"] == "pass@1"]
  splits = list(dict.fromkeys(r["split"] for r in mine))
  fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4), squeeze=False)
  for ax, split in zip(axes[0], splits):
    for stage in dict.fromkeys(r["stage"] for r in mine):
      points = [r for r in mine if r["split"] == split and r["stage"] == stage]
      color = None  # the stage's, for its thresholded points too
      for thresholded in (False, True):
        line = sorted(
          (r for r in points if (r["settings"].get("threshold") is not None) == thresholded),
          key=lambda r: r["tokens_per_forward"],
        )
        if not line:
          continue
        drawn = ax.errorbar(
          [r["tokens_per_forward"] for r in line],
          [r["value"] for r in line],
          yerr=[r["stderr"] for r in line],
          marker="s" if stage == "ar" else "o",
          markerfacecolor="none" if thresholded else None,
          linestyle=":" if thresholded else "-",
          capsize=3,
          color=color,
          label=stage + (" (threshold)" if thresholded else ""),
        )
        color = drawn.lines[0].get_color()
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per forward")
    ax.set_ylabel("pass@1")
    ax.set_ylim(-0.02, 1.0)
    ax.set_title(f"tasks: {split} split")
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  log(f"wrote {path}")


def table(rows: list[dict[str, Any]]) -> str:
  """Stage x (held-out bits; per sampler setting the tasks' pass@1 per split, or the
  validity parse rate, with the completions' entropy and tokens per forward)."""
  tasks = any(r["suite"] == "tasks" for r in rows)
  suite, metric = ("tasks", "pass@1") if tasks else ("validity", "parses")
  settings = []
  for r in rows:
    if r["suite"] == suite and r["metric"] == metric and r["settings"] not in settings:
      settings.append(r["settings"])

  def label(s: dict[str, Any]) -> str:
    if not s:
      return "token by token"
    threshold = s.get("threshold")
    return f"{s['steps_per_block']} steps" + (
      "" if threshold is None else f", threshold {threshold}"
    )

  what = "pass@1 test / combos" if tasks else "parses"
  lines = [
    "| stage | held-out bits/token (ELBO; AR: NLL) | setting | "
    + f"{what}, entropy (tokens/forward) |",
    "|---|---|---|---|",
  ]
  for name in dict.fromkeys(r["stage"] for r in rows):
    mine = [r for r in rows if r["stage"] == name]
    bits = [r for r in mine if r["suite"] == "nelbo" and r["metric"] in ("bits_elbo", "bits_nll")]
    first = f"{bits[0]['value']:.3f} +- {bits[0]['stderr']:.3f}" if bits else "-"
    stage = name
    for s in settings:
      hit = [
        r for r in mine if r["suite"] == suite and r["metric"] == metric and r["settings"] == s
      ]
      if not hit:
        continue
      values = " / ".join(f"{r['value']:.3f} +- {r['stderr']:.3f}" for r in hit)
      lines.append(
        f"| {stage} | {first} | {label(s)} | {values}, {hit[0]['completion_entropy']:.2f} bits "
        f"({hit[0]['tokens_per_forward']:.2f}) |"
      )
      stage = first = ""
  return "\n".join(lines)


_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (get_config).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Root directory: one workdir per stage under it.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    run(_CONFIG.value, _WORKDIR.value, log=lambda m: print(m, flush=True))
  except (ValueError, FileNotFoundError, checkpointing.CheckpointError, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def run_cli():
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run_cli()
