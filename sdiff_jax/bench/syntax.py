"""Function-header prompts and the syntax validity of their completions (`bench.quality`).

A completion counts as valid when `ast.parse` accepts the prompt plus the
completion cut after its last complete line (with `pass` appended so that an
open block still parses) and that cut holds at least one non-blank line: an
empty completion does not count.
"""

import ast
import re

from sdiff_jax.data import sources

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
  """Whether the completion's complete lines parse after the prompt (see the module docstring)."""
  complete_lines = completion[: completion.rfind("\n") + 1]
  if not complete_lines.strip():
    return False
  try:
    ast.parse(prompt + complete_lines + "    pass\n")
    return True
  except SyntaxError:
    return False
