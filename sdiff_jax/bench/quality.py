r"""Syntax validity of completions per decoding setting, for trained workdirs.

    python -m sdiff_jax.bench.quality --workdir=/tmp/sdiff_quickstart \
        --steps_per_block=1,2,4,8,32 --num_prompts=16 --json=quality.json

Prompts are the first `def` line (with its body's indentation) of validation
files. A completion counts as valid when `ast.parse` accepts the prompt plus
the completion cut after its last complete line (with `pass` appended so that
an open block still parses) and that cut holds at least one non-blank line:
an empty completion does not count. Causal workdirs are decoded token by token.
"""

import ast
import json
import re

from absl import app, flags, logging

from sdiff_jax import sample
from sdiff_jax.data import sources

_WORKDIR = flags.DEFINE_string("workdir", None, "Trained workdir.")
_STEPS = flags.DEFINE_list("steps_per_block", ["1", "2", "4", "8", "32"], "Settings to compare.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 16, "Prompts from the validation split.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens per completion.")
_JSON = flags.DEFINE_string("json", None, "Write rows here.")
flags.mark_flag_as_required("workdir")

_DEF = re.compile(r"^(def [A-Za-z_]\w*\([^)\n]*\)[^:\n]*:\n)", re.M)


def prompts_from(source: str, valid_fraction: float, count: int) -> list[str]:
  """Top-level function headers of the validation split, plus the body indent."""
  found = []
  for text in sources.load_corpus(source, "validation", valid_fraction):
    match = _DEF.search(text)
    if match:
      found.append(match.group(1) + "    ")
    if len(found) == count:
      break
  return found


def is_valid(prompt: str, completion: str) -> bool:
  complete_lines = completion[:completion.rfind("\n") + 1]
  if not complete_lines.strip():
    return False
  try:
    ast.parse(prompt + complete_lines + "    pass\n")
    return True
  except SyntaxError:
    return False


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs each restore step at INFO
  loaded = sample.load_model(_WORKDIR.value)
  d = loaded.config.data
  prompts = prompts_from(d.source, d.valid_fraction, _NUM_PROMPTS.value)
  steps = [1] if loaded.config.model.attention == "causal" else [int(s) for s in _STEPS.value]
  rows = []
  for s in steps:
    texts, stats = sample.generate(loaded, prompts, steps_per_block=s, max_new_tokens=_MAX_NEW.value)
    valid = sum(is_valid(p, t) for p, t in zip(prompts, texts))
    rows.append({"attention": loaded.config.model.attention, "steps_per_block": s,
                 "block_size": stats.settings.block_size, "prompts": len(prompts),
                 "valid_fraction": valid / len(prompts), "nfe": stats.nfe,
                 "tokens_per_forward": stats.tokens_per_forward})
    print(f"{rows[-1]['attention']:>13} steps/block {s:>2}: {valid}/{len(prompts)} parse, "
          f"NFE {stats.nfe}, {stats.tokens_per_forward:.2f} tokens/forward", flush=True)
  print("example:\n" + prompts[0] + texts[0])
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  app.run(main)
