r"""Sampling CLI: prompts in, completions and decoding statistics out.

    python -m sdiff_jax.sample --workdir=/tmp/sdiff_quickstart --prompt="def fibonacci(n):"
    python -m sdiff_jax.sample --workdir=/tmp/sdiff_quickstart --prompt_file=prompts.jsonl \
        --steps_per_block=4 --show_trajectory

`--prompt_file` holds one prompt per line, or JSONL objects with a `prompt` (or
`text`) field. Notebooks and scripts use `sdiff_jax.inference` directly.
"""

import sys

from absl import app, flags, logging

from sdiff_jax import checkpointing, inference, sampling

_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Training workdir (config.json, tokenizer, checkpoints)."
)
_PROMPT = flags.DEFINE_string("prompt", None, "One prompt.")
_PROMPT_FILE = flags.DEFINE_string(
  "prompt_file", None, "A batch of prompts: one per line, or JSONL with a `prompt`/`text` field."
)
_BLOCK_SIZE = flags.DEFINE_integer(
  "block_size", 0, "Tokens per block (0: the config's block_size)."
)
_STEPS_PER_BLOCK = flags.DEFINE_integer("steps_per_block", 8, "Most denoising forwards per block.")
_THRESHOLD = flags.DEFINE_float(
  "threshold", None, "Also commit every masked token above this confidence."
)
_ORDER = flags.DEFINE_enum(
  "order", "confidence", sampling.ORDERS, "Which masked positions a step commits."
)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling key; the same seed gives the same output.")
_SELF_CORRECTION = flags.DEFINE_bool(
  "self_correction", False, "Rewrite committed tokens the model replaces with high confidence."
)
_CACHE_MODE = flags.DEFINE_enum(
  "cache_mode",
  "fold",
  sampling.CACHE_MODES,
  "Bidirectional models: K/V of finished blocks (fold: rewritten in the next block's first "
  "forward; recompute: one more forward a block; last_forward: the old approx, for measuring).",
)
_SUFFIX_MASK = flags.DEFINE_bool(
  "suffix_mask",
  False,
  "Bidirectional models: every forward also sees the rest of the generation as MASK.",
)
_SHOW_TRAJECTORY = flags.DEFINE_bool(
  "show_trajectory", False, "Print each block's state after every denoising step."
)
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if (_PROMPT.value is None) == (_PROMPT_FILE.value is None):
    raise app.UsageError("pass exactly one of --prompt and --prompt_file")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs each restore step at INFO
  try:
    prompts = (
      [_PROMPT.value] if _PROMPT.value is not None else inference.read_prompts(_PROMPT_FILE.value)
    )
    if not prompts:
      raise ValueError(f"no prompts in {_PROMPT_FILE.value}")
    loaded = inference.load_model(_WORKDIR.value)
    overrides = dict(
      steps_per_block=_STEPS_PER_BLOCK.value,
      threshold=_THRESHOLD.value,
      order=_ORDER.value,
      temperature=_TEMPERATURE.value,
      top_p=_TOP_P.value,
      max_new_tokens=_MAX_NEW_TOKENS.value,
      self_correction=_SELF_CORRECTION.value,
      cache_mode=_CACHE_MODE.value,
      suffix_mask=_SUFFIX_MASK.value,
    )
    if _BLOCK_SIZE.value:
      overrides["block_size"] = _BLOCK_SIZE.value
    texts, stats = inference.complete(loaded, prompts, seed=_SEED.value, **overrides)
  except (ValueError, FileNotFoundError, checkpointing.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  s = stats.settings
  for i, (prompt, text) in enumerate(zip(prompts, texts)):
    print(f"=== sample {i} ===")
    if _SHOW_TRAJECTORY.value and s.attention != "causal":
      print("\n".join(inference.trajectory_frames(loaded.tokenizer, stats, i)))
      print("--- final ---")
    print(prompt + text)
  mode = (
    "AR"
    if s.attention == "causal"
    else (f"{s.attention}, block {s.block_size}, <= {s.steps_per_block} steps/block")
  )
  print(
    f"=== {len(prompts)} prompt(s), {mode}: {stats.nfe} forwards, "
    f"{stats.tokens_per_forward:.2f} tokens/forward (per row), "
    f"{stats.tokens_per_s:.1f} tokens/s "
    f"({stats.seconds:.2f} s, compilation included) ==="
  )


def run():
  """Console-script entry point (sdiff-sample)."""
  app.run(main)


if __name__ == "__main__":
  run()
