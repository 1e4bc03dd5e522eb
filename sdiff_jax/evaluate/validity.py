"""Validity suite: complete held-out functions from their signature and docstring.

Prompts: top-level functions (`def`, with a docstring and a body after it) of the
validation split, in file order; the prompt is the `def` line through the docstring's
closing quotes, without the newline after them (a byte-level BPE merges a newline with
the next line's indentation, so a prompt ending in a bare newline stops at a token
boundary the model rarely saw: measured on the quickstart AR model trained 2000 steps,
0 of 32 completions parsed after such prompts, 10 of 32 without the newline). The
reference is the rest of the function.

Trimming rule: the completion's first line is the rest of the prompt's last line; the
body is what follows it, cut after its last complete line (a line cut by the token
limit is dropped, unless the completion ended with EOS) and at its first non-blank
line indented less than the body (the function has ended there). Per prompt:
* parses: the prompt + the first line + the trimmed body (+ a `pass` line at the
  body's indent, so that an open block still parses) is valid Python, and the body
  has a non-blank line;
* exact: the first line is blank, the body ended (a dedent or EOS) and equals the
  reference (trailing whitespace and blank lines ignored);
* similarity: difflib's ratio between the trimmed completion and as many of the
  reference's first lines as the completion has (a completion stopped by the token
  limit is compared with as much of the body).
Each is averaged over the prompts with its standard error.
"""

import ast
import dataclasses
import difflib
import math
from typing import Iterable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class FunctionPrompt:
  prompt: str  # `def` line .. the docstring's closing quotes (no newline)
  reference: str  # the rest of the function's lines
  indent: str  # the body's indentation
  context: str = ""  # the document's lines above the function (imports, helpers)
  tests: str = ""  # the document's top-level asserts after the function that call it


def function_prompts(
  texts: Iterable[str], count: int, max_chars: int = 600
) -> list[FunctionPrompt]:
  """Up to `count` prompts (see the module docstring), prompts of at most `max_chars`."""
  found = []
  for text in texts:
    try:
      tree = ast.parse(text)
    except (SyntaxError, ValueError):
      continue
    lines = text.splitlines(keepends=True)
    for node in tree.body:
      if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      if ast.get_docstring(node) is None or len(node.body) < 2:
        continue
      doc_end = node.body[0].end_lineno  # 1-based, inclusive
      prompt = "".join(lines[node.lineno - 1 : doc_end]).rstrip("\n")
      reference = "".join(lines[doc_end : node.end_lineno])
      first = node.body[1]
      indent = lines[first.lineno - 1][: first.col_offset]
      if len(prompt) > max_chars or not reference.strip() or not lines[doc_end - 1].endswith("\n"):
        continue
      start = min([node.lineno] + [d.lineno for d in node.decorator_list])
      tests = [
        ast.get_source_segment(text, stmt) + "\n"
        for stmt in tree.body
        if isinstance(stmt, ast.Assert)
        and stmt.lineno > node.end_lineno
        and _calls(stmt, node.name)
      ]
      context = "".join(lines[: start - 1])
      found.append(FunctionPrompt(prompt, reference, indent, context, "".join(tests)))
      if len(found) == count:
        return found
  return found


def _calls(tree: ast.AST, name: str) -> bool:
  return any(
    isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == name
    for n in ast.walk(tree)
  )


def program(item: FunctionPrompt, completion: str, ended: bool) -> str:
  """The function with the completion's body (trimmed as `score` trims it) between the
  document's context and its tests: passes iff the body does what the tests check."""
  first, _, rest = completion.partition("\n")
  body, _ = trim(rest, item.indent, ended)
  return f"{item.context}{item.prompt}{first}\n{body.rstrip()}\n\n\n{item.tests}"


def trim(completion: str, indent: str, ended: bool) -> tuple[str, bool]:
  """(the completion cut by the module's rule, whether the function ended in it)."""
  if not ended:
    completion = completion[: completion.rfind("\n") + 1]
  kept = []
  for line in completion.splitlines(keepends=True):
    if line.strip() and not line.startswith(indent):
      return "".join(kept), True
    kept.append(line)
  return "".join(kept), ended


def _normal(text: str) -> list[str]:
  return [line.rstrip() for line in text.splitlines() if line.strip()]


def score(item: FunctionPrompt, completion: str, ended: bool) -> dict[str, float]:
  """parses / exact / similarity of one completion (see the module docstring)."""
  first, newline, rest = completion.partition("\n")
  body, finished = trim(rest, item.indent, ended) if newline else ("", ended)
  try:
    ast.parse(item.prompt + first + "\n" + body + item.indent + "pass\n")
    parses = bool(body.strip())
  except (SyntaxError, ValueError):
    parses = False
  got, want = _normal(body), _normal(item.reference)
  exact = finished and not first.strip() and got == want
  similarity = difflib.SequenceMatcher(None, "\n".join(got), "\n".join(want[: len(got)])).ratio()
  return {"parses": float(parses), "exact": float(exact), "similarity": similarity if got else 0.0}


def mean_se(values: Sequence[float]) -> tuple[float, float]:
  """(mean, standard error of the mean); NaN where there are too few values."""
  v = np.asarray(values, np.float64)
  mean = float(v.mean()) if v.size else float("nan")
  return mean, float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")


def summarise(scores: Sequence[dict[str, float]]) -> dict[str, tuple[float, float]]:
  """metric -> (mean, standard error) over the prompts."""
  return {name: mean_se([s[name] for s in scores]) for name in ("parses", "exact", "similarity")}
