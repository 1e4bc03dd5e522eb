r"""Learning curves: AR, bidirectional and block_causal models trained on identical data.

    python -m sdiff_jax.bench.learning --config=configs/quickstart.py --steps=200 \
        --modes=causal,bidirectional,bidirectional+shift,bidirectional+shift+ar=0.5 \
        --eval_steps=50,100,150,200 --json=learning.json --png=learning.png

Each mode trains `--steps` steps of the config on the same batches (same data seed)
from the same initialisation seed; at each of `--eval_steps` its held-out bits/token
(`evaluate.nelbo`: ELBO for diffusion models, NLL for AR, with a standard error over
a fixed, shuffled set of validation rows) is recorded against steps and training
tokens seen, beside the unigram baseline on the same rows. A mode is an attention
mode with optional `+` variants (the base config's shift, AR stage, loss weighting and
read_next are reset, so a mode names them all): `shift` (diffusion.shift=True), `ar=F`
(curriculum.ar_fraction=F: the first F of the steps train the next-token loss on the
same parameters, i.e. an AR model adapted to diffusion within the step budget), `mean`
(diffusion.loss_weighting="masked_mean": train on the masked tokens' mean NLL; the
held-out bits stay the ELBO), `next` (model.read_next=True: output t also reads position
t + 1's final state, with shift the target's own input).
Writes JSON rows and, with matplotlib installed, a PNG of both curves.
"""

import json
import sys
import time

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from sdiff_jax import config_lib, sharding, train
from sdiff_jax.checkpointing import Workdir
from sdiff_jax.evaluate import nelbo

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", "Config file.")
_MODES = flags.DEFINE_list(
  "modes",
  ["causal", "bidirectional", "block_causal"],
  "Attention modes to train, with +shift / +ar=F variants.",
)
_STEPS = flags.DEFINE_integer("steps", 200, "Training steps per mode (train.num_steps).")
_EVAL_STEPS = flags.DEFINE_list(
  "eval_steps", ["50", "100", "150", "200"], "Steps at which the held-out bits are measured."
)
_HELDOUT_ROWS = flags.DEFINE_integer("heldout_rows", 64, "Held-out validation rows.")
_REPEATS = flags.DEFINE_integer("repeats", 4, "Noise levels per held-out row (diffusion).")
_WORKDIR = flags.DEFINE_string(
  "workdir", "/tmp/sdiff_learning", "Where the tokenizer is built or found (tokenizer/)."
)
_JSON = flags.DEFINE_string("json", None, "Write the rows here.")
_PNG = flags.DEFINE_string("png", None, "Plot bits against steps and tokens here.")


def mode_config(base: ml_collections.ConfigDict, mode: str) -> ml_collections.ConfigDict:
  """`base` with the attention mode and variants of `mode` (see the module docstring)."""
  attention, *variants = mode.split("+")
  config = ml_collections.ConfigDict(base.to_dict())
  config.attention = attention
  # a mode says all of these
  config.diffusion.shift, config.curriculum.ar_fraction = False, 0.0
  config.diffusion.loss_weighting = "elbo"
  config.model.read_next = False
  for variant in variants:
    name, _, value = variant.partition("=")
    if name == "shift":
      config.diffusion.shift = True
    elif name == "ar":
      config.diffusion.shift = True
      config.curriculum.ar_fraction = float(value)
    elif name == "mean":
      config.diffusion.loss_weighting = "masked_mean"
    elif name == "next":
      config.model.read_next = True
    else:
      raise ValueError(
        f"mode {mode!r}: unknown variant {variant!r} (valid: shift, ar=F, mean, next)"
      )
  config_lib.validate(config)
  return config


def train_mode(
  base: ml_collections.ConfigDict, mode: str, tok, heldout, eval_steps: set[int], workdir: Workdir
) -> list[dict]:
  """Trains one mode, returning a row per evaluation."""
  config = mode_config(base, mode)
  mesh = sharding.make_mesh(config.mesh)
  train_iter = iter(train.make_datasets(config, workdir, tok)[0])  # the same batches each mode
  setup = train.TrainSetup.create(config, tok.vocab_size, mesh)
  state = setup.init_state(jax.random.key(config.seed))
  step_fn = train.make_train_step(setup)
  key = jax.random.key(config.seed + 2)
  rows, start = [], time.perf_counter()
  for step in range(config.train.num_steps):
    stage = config_lib.stage_at(config, step)
    state, metrics = step_fn(state, sharding.global_batch(next(train_iter), mesh), key, stage=stage)
    if step + 1 in eval_steps:
      bits = nelbo.heldout_bits(setup.objective, state.params, heldout, _REPEATS.value)
      rows.append(
        {
          "mode": mode,
          "attention": config.attention,
          "step": step + 1,
          "stage": stage,
          "tokens": (step + 1) * config.train.batch_size * config.data.seq_len,
          "bits": bits.mean,
          "stderr": bits.stderr,
          "heldout_rows": bits.rows,
          "repeats": bits.repeats,
          "train_loss": float(metrics["loss"]),
          "train_metrics": {k: float(v) for k, v in metrics.items()},
          "seconds": time.perf_counter() - start,
        }
      )
      print(
        f"{mode:>28} step {step + 1:>5} [{stage}]: held-out {bits} bits/token "
        + (
          f"(train edit bits {float(metrics['edit_bits']):.3f}, copy baseline "
          f"{float(metrics['edit_copy_bits']):.3f}) "
          if "edit_bits" in metrics
          else ""
        )
        + f"({time.perf_counter() - start:.0f} s)",
        flush=True,
      )
  return rows


def plot(rows: list[dict], unigram: float, path: str) -> None:
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
    return
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, x_name in zip(axes, ("step", "tokens")):
    for mode in dict.fromkeys(r["mode"] for r in rows):
      points = [r for r in rows if r["mode"] == mode]
      ax.errorbar(
        [p[x_name] for p in points],
        [p["bits"] for p in points],
        yerr=[p["stderr"] for p in points],
        marker="o",
        capsize=3,
        label=mode,
      )
    ax.axhline(unigram, color="gray", linestyle="--", label="unigram")
    ax.set_xlabel("training steps" if x_name == "step" else "training tokens seen")
    ax.set_ylabel("held-out bits/token")
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=90)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  base = _CONFIG.value
  base.train.num_steps = _STEPS.value
  eval_steps = {int(s) for s in _EVAL_STEPS.value}
  workdir = Workdir(_WORKDIR.value)
  tok = train.build_tokenizer(base, workdir)
  data_config = ml_collections.ConfigDict(base.data.to_dict())
  heldout = nelbo.heldout_rows(data_config, tok, _HELDOUT_ROWS.value)
  unigram = nelbo.unigram_bits(data_config, tok, heldout)
  print(
    f"unigram baseline: {unigram:.3f} bits/token on {_HELDOUT_ROWS.value} held-out rows", flush=True
  )
  rows = []
  for mode in _MODES.value:
    rows += train_mode(base, mode, tok, heldout, eval_steps, workdir)
  result = {
    "unigram_bits": unigram,
    "rows": rows,
    "config": base.to_dict(),
    "devices": [str(d) for d in jax.devices()],
  }
  print("\n| mode | step | tokens | held-out bits | vs unigram |\n|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['mode']} | {r['step']} | {r['tokens']:,} | {r['bits']:.3f} +- {r['stderr']:.3f} "
      f"| {r['bits'] - unigram:+.2f} |"
    )
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=1, default=str)
  if _PNG.value:
    plot(rows, unigram, _PNG.value)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
