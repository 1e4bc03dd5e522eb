r"""Evaluates a trained workdir: a table on stdout, every number in JSON.

    python -m sdiff_jax.evaluate --workdir=/tmp/sdiff_quickstart \
        --suites=nelbo,validity,repair --steps_per_block=1,2,4,8 --json=eval.json

Sampler settings are lists: the decoding suites run once per combination and report
tokens per forward and tokens/s beside the quality (see `evaluate/run.py`).
"""

import json
import sys

from absl import app, flags, logging

from sdiff_jax import checkpointing, sampling
from sdiff_jax.evaluate import run as run_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Trained workdir.")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint to evaluate (default: latest).")
_SUITES = flags.DEFINE_list(
  "suites", ["nelbo", "validity", "repair"], f"Any of {', '.join(run_lib.SUITES)}."
)
_JSON = flags.DEFINE_string("json", None, "Write the rows and options here.")
_HELDOUT_ROWS = flags.DEFINE_integer("heldout_rows", 64, "nelbo / repair: held-out rows.")
_REPEATS = flags.DEFINE_integer("repeats", 4, "nelbo: noise levels per row (diffusion).")
_CORPORA = flags.DEFINE_list("corpus", [], "nelbo: other corpora (directory, glob, JSONL).")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 32, "validity / judge: prompts.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens per completion.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Prompts decoded together.")
_STEPS = flags.DEFINE_list("steps_per_block", ["1", "2", "4", "8"], "Sampler grid.")
_THRESHOLD = flags.DEFINE_list("threshold", [], "Sampler grid ('none': no threshold).")
_CACHE_MODE = flags.DEFINE_list("cache_mode", [], f"Sampler grid: {sampling.CACHE_MODES}.")
_ORDER = flags.DEFINE_list("order", [], f"Sampler grid: {sampling.ORDERS}.")
_BLOCK_SIZE = flags.DEFINE_list("block_size", [], "Sampler grid (default: the model's).")
_ALPHA = flags.DEFINE_float("repair_alpha", 0.05, "repair: edit rate of the corruption.")
_JUDGE = flags.DEFINE_string("judge_workdir", None, "judge: a trained causal workdir.")
_SAMPLES = flags.DEFINE_integer("humaneval_samples", 1, "humaneval: samples per problem (n).")
_TEMPERATURE = flags.DEFINE_float(
  "humaneval_temperature", 0.8, "humaneval, tasks: sampling temperature when n > 1."
)
_TIMEOUT = flags.DEFINE_float("humaneval_timeout_s", 10.0, "humaneval: per candidate.")
_RESULTS = flags.DEFINE_string(
  "humaneval_results", None, "humaneval: resumable results, PREFIX.<setting>.jsonl."
)
_CANONICAL = flags.DEFINE_bool(
  "canonical", False, "humaneval: run the canonical solutions (checks the harness, no model)."
)
_TASKS_SAMPLES = flags.DEFINE_integer("tasks_samples", 1, "tasks: completions per task (n).")
_TASKS_NUM = flags.DEFINE_integer("tasks_num", 128, "tasks, tasks_infill: tasks per split.")
_TASKS_SPLITS = flags.DEFINE_list("tasks_splits", ["test", "combos"], "tasks: testbed splits.")
_TASKS_MAX_NEW = flags.DEFINE_integer("tasks_max_new_tokens", 96, "tasks: tokens per body.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling and corruption seed.")


def _grid() -> dict:
  return {
    "steps_per_block": [int(s) for s in _STEPS.value],
    "threshold": [None if t.lower() == "none" else float(t) for t in _THRESHOLD.value],
    "cache_mode": list(_CACHE_MODE.value),
    "order": list(_ORDER.value),
    "block_size": [int(b) for b in _BLOCK_SIZE.value],
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs each restore step at INFO
  if _CANONICAL.value:
    print(run_lib.table(run_lib.canonical_rows(_TIMEOUT.value)))
    return
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (or --canonical)")
  options = run_lib.Options(
    suites=tuple(_SUITES.value),
    heldout_rows=_HELDOUT_ROWS.value,
    repeats=_REPEATS.value,
    corpora=tuple(_CORPORA.value),
    num_prompts=_NUM_PROMPTS.value,
    max_new_tokens=_MAX_NEW.value,
    batch_size=_BATCH.value,
    grid=_grid(),
    repair_alpha=_ALPHA.value,
    judge_workdir=_JUDGE.value,
    humaneval={
      "samples": _SAMPLES.value,
      "temperature": _TEMPERATURE.value,
      "timeout_s": _TIMEOUT.value,
      "results": _RESULTS.value,
    },
    tasks={
      "samples": _TASKS_SAMPLES.value,
      "temperature": _TEMPERATURE.value,
      "num": _TASKS_NUM.value,
      "splits": tuple(_TASKS_SPLITS.value),
      "max_new_tokens": _TASKS_MAX_NEW.value,
    },
    seed=_SEED.value,
  )
  try:
    rows = run_lib.evaluate(_WORKDIR.value, options, _STEP.value)
  except (ValueError, FileNotFoundError, checkpointing.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(run_lib.table(rows))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"workdir": _WORKDIR.value, "step": _STEP.value, "rows": rows}, f, indent=1)


def run():
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
