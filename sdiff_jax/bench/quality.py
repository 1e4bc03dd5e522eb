r"""Syntax validity of completions per decoding setting, for trained workdirs, JSON rows.

    python -m sdiff_jax.bench.quality --workdir=/tmp/sdiff_quickstart \
        --steps_per_block=1,2,4,8,32 --num_prompts=16 --json=quality.json

Prompts are the first `def` line (up to its colon) of validation
files; `bench.syntax` says when a completion counts as valid. Causal workdirs
are decoded token by token.
"""

import json

from absl import app, flags, logging

from sdiff_jax import inference, sampling
from sdiff_jax.bench import syntax

_WORKDIR = flags.DEFINE_string("workdir", None, "Trained workdir.")
_STEPS = flags.DEFINE_list("steps_per_block", ["1", "2", "4", "8", "32"], "Settings to compare.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 16, "Prompts from the validation split.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens per completion.")
_CACHE_MODE = flags.DEFINE_enum(
  "cache_mode", "fold", sampling.CACHE_MODES, "Bidirectional workdirs: K/V of finished blocks."
)
_SUFFIX_MASK = flags.DEFINE_bool(
  "suffix_mask", False, "Bidirectional workdirs: forwards also see the rest as MASK."
)
_JSON = flags.DEFINE_string("json", None, "Write rows here.")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs each restore step at INFO
  loaded = inference.load_model(_WORKDIR.value)
  d, attention = loaded.config.data, loaded.config.attention
  prompts = syntax.prompts_from(d.source, d.valid_fraction, _NUM_PROMPTS.value)
  steps = [1] if attention == "causal" else [int(s) for s in _STEPS.value]
  block_flags = (
    dict(cache_mode=_CACHE_MODE.value, suffix_mask=_SUFFIX_MASK.value)
    if attention == "bidirectional"
    else {}
  )
  rows = []
  for s in steps:
    texts, stats = inference.complete(
      loaded, prompts, steps_per_block=s, max_new_tokens=_MAX_NEW.value, **block_flags
    )
    valid = sum(syntax.is_valid(p, t) for p, t in zip(prompts, texts))
    rows.append(
      {
        "attention": attention,
        "steps_per_block": s,
        "block_size": stats.settings.block_size,
        **block_flags,
        "prompts": len(prompts),
        "valid_fraction": valid / len(prompts),
        "nfe": stats.nfe,
        "tokens_per_forward": stats.tokens_per_forward,
      }
    )
    print(
      f"{attention:>13} steps/block {s:>2}: {valid}/{len(prompts)} parse, "
      f"NFE {stats.nfe}, {stats.tokens_per_forward:.2f} tokens/forward",
      flush=True,
    )
  print("example:\n" + prompts[0] + texts[0])
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(rows, f, indent=2)


def run():
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
