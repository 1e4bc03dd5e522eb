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
checkpoint. At the end each stage's model is evaluated (`chain.eval_prompts` validity
prompts, 0 skips it) at the on-policy sampler's setting and at
`chain.eval_steps_per_block`: held-out ELBO, parse rate, the completions' unigram
entropy (repetition parses; real function bodies have ~4.9 bits) and tokens per forward,
as a table on stdout and rows in WORKDIR/chain.json.
"""

import json
import os
import sys
from typing import Any, Callable

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from sdiff_jax import checkpointing, config_lib, sharding, train, trajectories
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
  o = config.onpolicy
  steps = sorted({*config.chain.eval_steps_per_block, o.steps_per_block})
  options = evaluate_lib.Options(
    suites=("nelbo", "validity"),
    num_prompts=config.chain.eval_prompts,
    heldout_rows=config.chain.eval_heldout_rows,
    max_new_tokens=o.max_new_tokens,
    grid={"steps_per_block": steps, "threshold": (None, o.threshold)},
  )
  rows = []
  for name in TRAINED:
    log(f"===== evaluating {name}")
    rows += [{"stage": name, **r} for r in evaluate_lib.evaluate(os.path.join(root, name), options)]
  if jax.process_index() == 0:
    with open(os.path.join(root, "chain.json"), "w") as f:
      json.dump(rows, f, indent=1)
    log(table(rows))
  return rows


def table(rows: list[dict[str, Any]]) -> str:
  """Stage x (held-out ELBO; parse rate, completion entropy and tokens per forward per
  sampler setting)."""
  settings = []
  for r in rows:
    if r["metric"] == "parses" and r["settings"] not in settings:
      settings.append(r["settings"])

  def label(s: dict[str, Any]) -> str:
    threshold = s.get("threshold")
    return f"{s['steps_per_block']} steps" + (
      "" if threshold is None else f", threshold {threshold}"
    )

  lines = [
    "| stage | held-out ELBO (bits/token) | "
    + " | ".join(f"parses, entropy @ {label(s)}" for s in settings)
    + " |",
    "|---" * (2 + len(settings)) + "|",
  ]
  for name in TRAINED:
    mine = [r for r in rows if r["stage"] == name]
    elbo = [r for r in mine if r["suite"] == "nelbo" and r["metric"] == "bits_elbo"]
    cells = [f"{elbo[0]['value']:.3f} +- {elbo[0]['stderr']:.3f}" if elbo else "-"]
    for s in settings:
      hit = {r["metric"]: r for r in mine if r["suite"] == "validity" and r["settings"] == s}
      cells.append(
        f"{hit['parses']['value']:.2f}, {hit['completion_entropy']['value']:.1f} bits "
        f"({hit['parses']['tokens_per_forward']:.2f} tok/fwd)"
        if hit
        else "-"
      )
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
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
