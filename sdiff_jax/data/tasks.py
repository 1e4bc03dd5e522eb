r"""A code testbed a small model learns: generated Python functions with their tests.

Every task is a function of 2-10 body lines composed from a grammar of pieces, one per slot:

  family     a list of integers `xs`, the numbers 1..n, the digits of n (integers);
             a string `s` (characters); a sentence `text` (words)
  filter     which items count (even, greater than K, vowel, longer than K, ...): an `if`
  transform  what is taken of an item (its square, twice it, its upper case, ...)
  reduce     what is returned: an accumulator (sum, product, count, a list, a string, a
             dict of counts), the largest / smallest (None when there is none), an early
             return (the first match, -1 / "" / None when there is none; whether any)

A few filters call a helper defined above the function (`is_prime`, `is_palindrome`),
which is part of the prompt. The function's name and its one-line docstring say what it
computes, each piece in two phrasings (so no template string maps to one body), the
docstring sometimes with one example, as HumanEval's. Three asserts follow, their expected
values computed by running the function on generated inputs (which do not all give the
same answer). A task is a pure function of (seed, split, index); the programs terminate by
construction (every loop runs over its input) and one that raised would be regenerated.

The composition (family, filter, transform, reduce: the pieces without their constants)
decides the split, by a stable hash: `train`, `validation` and `test` share no composition,
and `combos` holds the compositions that contain a *pair* of pieces held out of all others
(COMBO_FRACTION of the pairs): does a model compose pieces it has never seen together?

As a corpus source: `data.source = "tasks"` (TRAIN_SIZE training tasks) or
"tasks:N" (N, up to 2**31 - 1: generated on access, so an effectively unbounded stream
through the same grain pipeline with exact resume); evaluation splits hold EVAL_SIZE tasks.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import random
from collections.abc import Callable, Sequence
from typing import Any

SPLITS = ("train", "validation", "test", "combos")
TRAIN_SIZE = 50_000  # tasks in the training split of source "tasks"
EVAL_SIZE = 1_000  # tasks in each of the other splits
MAX_SIZE = 2**31 - 1
VERSION = 1  # of the generator: a change of any task's text bumps it (TFDS rebuilds)
VALIDATION_FRACTION = 0.05  # of the compositions outside `combos`
TEST_FRACTION = 0.1
COMBO_FRACTION = 0.02  # of the pairs of pieces (of different slots)
ASSERTS = 3
INDENT = "    "


@dataclasses.dataclass(frozen=True)
class Piece:
  """One choice for one slot: a name (what the split hashes), code and phrasings.

  Code and phrasings are format strings over the item variable `{v}` and the piece's
  constant `{k}` (drawn from `ks` when it has one).
  """

  name: str
  code: str = ""  # filter: a condition; transform: an expression; "" = none
  phrases: tuple[str, ...] = ("",)  # filter: a relative clause; transform: "the squares of"
  words: tuple[str, ...] = ("",)  # name parts for the function name
  ks: tuple = ()  # constants to draw from
  helper: str = ""  # a function this piece calls, defined above the task's function


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  arg: str  # the function's argument
  loop: str  # the loop header over items, binding {v}
  var: str  # the item variable
  noun: tuple[str, ...]  # what the items are, plural ("numbers in xs")
  filters: tuple[Piece, ...]
  transforms: tuple[Piece, ...]
  reduces: tuple[str, ...]  # names of REDUCES this family allows
  inputs: Callable[[random.Random], Any]  # a random argument


_IS_PRIME = '''def is_prime(n):
    """Return True if n is a prime number."""
    if n < 2:
        return False
    for d in range(2, n):
        if n % d == 0:
            return False
    return True
'''

_IS_PALINDROME = '''def is_palindrome(word):
    """Return True if word reads the same backwards."""
    return word == word[::-1]
'''

_NUMBER_FILTERS = (
  Piece("all"),
  Piece("even", "{v} % 2 == 0", ("that are even", "that are divisible by 2"), ("even", "evens")),
  Piece("odd", "{v} % 2 == 1", ("that are odd", "that are not even"), ("odd", "odds")),
  Piece("positive", "{v} > 0", ("that are positive", "that are above zero"), ("positive",)),
  Piece(
    "greater",
    "{v} > {k}",
    ("greater than {k}", "that exceed {k}"),
    ("big", "above_{k}"),
    ks=tuple(range(2, 10)),
  ),
  Piece(
    "less",
    "{v} < {k}",
    ("less than {k}", "below {k}"),
    ("small", "below_{k}"),
    ks=tuple(range(2, 10)),
  ),
  Piece(
    "multiple",
    "{v} % {k} == 0",
    ("divisible by {k}", "that are multiples of {k}"),
    ("multiples",),
    ks=(3, 4, 5, 7),
  ),
  Piece(
    "prime",
    "is_prime({v})",
    ("that are prime", "that are prime numbers"),
    ("prime", "primes"),
    helper=_IS_PRIME,
  ),
)
_NUMBER_TRANSFORMS = (
  Piece("same"),
  Piece("square", "{v} * {v}", ("the squares of", "the square of each of"), ("squares", "squared")),
  Piece(
    "times",
    "{v} * {k}",
    ("{k} times", "the products with {k} of"),
    ("scaled", "times_{k}"),
    ks=(2, 3, 5, 10),
  ),
  Piece(
    "plus",
    "{v} + {k}",
    ("{k} more than", "the sums with {k} of"),
    ("shifted", "plus_{k}"),
    ks=(1, 2, 5, 10),
  ),
  Piece("negate", "-{v}", ("the negatives of", "minus"), ("negated",)),
  Piece(
    "mod",
    "{v} % {k}",
    ("the remainders modulo {k} of", "the remainders after dividing by {k} of"),
    ("mod_{k}", "remainders"),
    ks=(3, 4, 5, 10),
  ),
)
_CHAR_FILTERS = (
  Piece("all"),
  Piece("vowel", '{v} in "aeiouAEIOU"', ("that are vowels", "that are vowel letters"), ("vowels",)),
  Piece("digit", "{v}.isdigit()", ("that are digits", "that are decimal digits"), ("digits",)),
  Piece(
    "upper",
    "{v}.isupper()",
    ("that are uppercase", "that are capital letters"),
    ("upper", "capitals"),
  ),
  Piece("lower", "{v}.islower()", ("that are lowercase", "that are small letters"), ("lower",)),
  Piece("letter", "{v}.isalpha()", ("that are letters", "that are alphabetic"), ("letters",)),
  Piece(
    "nonspace",
    "{v} != \" \"",
    ("that are not spaces", "other than spaces"),
    ("nonspace", "visible"),
  ),
)
_CHAR_TRANSFORMS = (
  Piece("same"),
  Piece(
    "upper", "{v}.upper()", ("the upper case of", "the uppercase versions of"), ("upper", "shouted")
  ),
  Piece(
    "lower", "{v}.lower()", ("the lower case of", "the lowercase versions of"), ("lower", "quiet")
  ),
  Piece("double", "{v} * 2", ("two copies of each of", "doubled copies of"), ("doubled", "twice")),
  Piece(
    "swap", "{v}.swapcase()", ("the swapped case of", "the case-swapped versions of"), ("swapped",)
  ),
)
_WORD_FILTERS = (
  Piece("all"),
  Piece(
    "long",
    "len({v}) > {k}",
    ("longer than {k} letters", "with more than {k} letters"),
    ("long",),
    ks=(2, 3, 4, 5),
  ),
  Piece(
    "short",
    "len({v}) < {k}",
    ("shorter than {k} letters", "with fewer than {k} letters"),
    ("short",),
    ks=(3, 4, 5),
  ),
  Piece(
    "capital",
    "{v}[0].isupper()",
    ("that start with a capital", "that are capitalized"),
    ("capitalized", "proper"),
  ),
  Piece(
    "starts",
    '{v}.startswith("{k}")',
    ('that start with "{k}"', 'beginning with "{k}"'),
    ("starting_{k}",),
    ks=tuple("abcdst"),
  ),
  Piece(
    "palindrome",
    "is_palindrome({v})",
    ("that are palindromes", "that read the same backwards"),
    ("palindromes",),
    helper=_IS_PALINDROME,
  ),
)
_WORD_TRANSFORMS = (
  Piece("same"),
  Piece(
    "upper", "{v}.upper()", ("the upper case of", "the uppercase versions of"), ("upper", "loud")
  ),
  Piece(
    "reverse",
    "{v}[::-1]",
    ("the reverses of", "the reversed versions of"),
    ("reversed", "backwards"),
  ),
  Piece("length", "len({v})", ("the lengths of", "the letter counts of"), ("lengths", "sizes")),
  Piece(
    "first", "{v}[0]", ("the first letters of", "the initials of"), ("initials", "first_letters")
  ),
)

_WORDS = (
  "apple Anna bob cat Dan dog ear egg Eve fig go hat I ice jam kayak level moon "
  "noon owl pop racecar sea star sun tea toy up wow yes zoo Bob Sam"
).split()
_CHARS = "abcdeiouxyzABEIOXZ 0123479 "


def _int_list(rng: random.Random) -> list[int]:
  return [rng.randint(-9, 20) for _ in range(rng.randint(0, 7))]


def _string(rng: random.Random) -> str:
  return "".join(rng.choice(_CHARS) for _ in range(rng.randint(0, 10)))


def _sentence(rng: random.Random) -> str:
  return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(0, 6)))


FAMILIES = (
  Family("list", "xs", "for {v} in xs:", "x", ("numbers in xs", "elements of xs", "values in xs"),
         _NUMBER_FILTERS, _NUMBER_TRANSFORMS,
         ("sum", "product", "count", "list", "max", "min", "first", "any"), _int_list),
  Family("range", "n", "for {v} in range(1, n + 1):", "i",
         ("numbers from 1 to n", "integers between 1 and n"), _NUMBER_FILTERS,
         _NUMBER_TRANSFORMS, ("sum", "product", "count", "list", "max", "first"),
         lambda rng: rng.randint(0, 25)),
  Family("digits", "n", "for {v} in map(int, str(n)):", "d", ("digits of n",),
         _NUMBER_FILTERS, _NUMBER_TRANSFORMS, ("sum", "product", "count", "list", "max", "min"),
         lambda rng: rng.randint(0, 10**rng.randint(1, 6))),
  Family("chars", "s", "for {v} in s:", "c", ("characters of s", "characters in s"),
         _CHAR_FILTERS, _CHAR_TRANSFORMS, ("join", "count", "list", "first", "any"), _string),
  Family("words", "text", "for {v} in text.split():", "w", ("words of text", "words in text"),
         _WORD_FILTERS, _WORD_TRANSFORMS,
         ("join_words", "count", "list", "first", "tally", "longest"), _sentence),
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Reduce:
  """What the function returns. `init` and `update` are lines ({e}: the transformed item);
  `after`: the last line; `phrases`: the docstring around the noun phrase {np}."""

  name: str
  init: tuple[str, ...]
  update: tuple[str, ...]
  after: str
  phrases: tuple[str, ...]
  words: tuple[str, ...]
  needs_transform: bool = True  # False: the transform does not matter (only "same")


REDUCES = {
  r.name: r
  for r in (
    Reduce("sum", ("total = 0",), ("total += {e}",), "return total",
           ("Return the sum of {np}.", "Add up {np}."), ("sum", "total")),
    Reduce("product", ("result = 1",), ("result *= {e}",), "return result",
           ("Return the product of {np}.", "Multiply together {np}."), ("product",)),
    Reduce("count", ("count = 0",), ("count += 1",), "return count",
           ("Return how many of {np} there are.", "Count {np}."), ("count", "how_many"),
           needs_transform=False),
    Reduce("list", ("result = []",), ("result.append({e})",), "return result",
           ("Return a list of {np}.", "Collect {np} into a list."), ("list", "collect")),
    Reduce("max", ("best = None",), ("if best is None or {e} > best:", INDENT + "best = {e}"),
           "return best", ("Return the largest of {np}, or None if there are none.",
                           "Find the maximum of {np} (None when there is none)."),
           ("max", "largest")),
    Reduce("min", ("best = None",), ("if best is None or {e} < best:", INDENT + "best = {e}"),
           "return best", ("Return the smallest of {np}, or None if there are none.",
                           "Find the minimum of {np} (None when there is none)."),
           ("min", "smallest")),
    Reduce("first", (), ("return {e}",), "return {missing}",
           ("Return the first of {np}, or {missing} if there is none.",
            "Find the first of {np}; {missing} when there is none."), ("first",)),
    Reduce("any", (), ("return True",), "return False",
           ("Return whether there are any of {np}.", "Check whether any of {np} exist."),
           ("has", "any"), needs_transform=False),
    Reduce("join", ('result = ""',), ("result += {e}",), "return result",
           ("Return a string of {np}, in order.", "Join {np} into a string."),
           ("join", "string_of")),
    Reduce("join_words", ("result = []",), ("result.append({e})",), 'return " ".join(result)',
           ("Return {np} joined by spaces.", "Join {np} with single spaces."),
           ("joined", "sentence_of")),
    Reduce("tally", ("counts = {{}}",), ("counts[{e}] = counts.get({e}, 0) + 1",),
           "return counts", ("Return a dict that maps each of {np} to how often it occurs.",
                             "Count how often each of {np} occurs, in a dict."),
           ("tally", "counts_of")),
    Reduce("longest", ('best = ""',), ("if len({e}) > len(best):", INDENT + "best = {e}"),
           "return best", ("Return the longest of {np} (the first one on ties, \"\" if none).",
                           "Find the longest of {np}; the first on ties, \"\" when none."),
           ("longest",)),
  )
}  # fmt: skip
_ARG_WORDS = {  # an optional last part of the function's name
  "list": "in_list",
  "range": "upto_n",
  "digits": "in_digits",
  "chars": "in_string",
  "words": "in_text",
}
_MISSING = {"list": "-1", "range": "-1", "digits": "-1", "chars": '""', "words": '""'}


@dataclasses.dataclass(frozen=True)
class Composition:
  family: str
  filter: str
  transform: str
  reduce: str

  @property
  def pieces(self) -> tuple[str, ...]:
    return (
      f"family={self.family}",
      f"filter={self.filter}",
      f"transform={self.transform}",
      f"reduce={self.reduce}",
    )

  def __str__(self) -> str:
    return "/".join((self.family, self.filter, self.transform, self.reduce))


@dataclasses.dataclass(frozen=True)
class Task:
  """One generated task: its program (`text`, the training document) passes its asserts."""

  name: str  # "train/17"
  composition: Composition
  entry_point: str  # the function's name
  prompt: str  # helper (if any), header and docstring, ending in a newline
  body: str  # the reference body, indented, ending in a newline
  tests: str  # ASSERTS assert lines, ending in a newline

  @property
  def text(self) -> str:
    """The training document."""
    return self.program(self.body)

  def program(self, body: str) -> str:
    """The program that passes iff `body` (leading newlines dropped) computes what the
    docstring says."""
    return f"{self.prompt}{body.lstrip(chr(10)).rstrip()}\n\n\n{self.tests}"


def _hash_unit(text: str) -> float:
  digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "big") / 2**64


def _valid(family: Family, f: Piece, t: Piece, r: str) -> bool:
  if not REDUCES[r].needs_transform and t.name != "same":
    return False  # the transform would not change the answer
  if r in ("join", "join_words", "longest") and t.name == "length":
    return False  # these need strings
  if r == "product":  # keep the answers short: no growing transforms, no long ranges
    return family.name != "range" and t.name in ("same", "negate", "mod")
  return True


@functools.cache
def compositions() -> dict[str, tuple[Composition, ...]]:
  """Every valid composition, by split."""
  held_pairs = set()
  every = []
  for family in FAMILIES:
    for f, t, r in itertools.product(family.filters, family.transforms, family.reduces):
      if _valid(family, f, t, r):
        every.append(Composition(family.name, f.name, t.name, r))
  for c in every:
    for a, b in itertools.combinations(c.pieces, 2):
      if _hash_unit(f"pair|{a}|{b}") < COMBO_FRACTION:
        held_pairs.add((a, b))
  by_split: dict[str, list[Composition]] = {split: [] for split in SPLITS}
  for c in every:
    if any(pair in held_pairs for pair in itertools.combinations(c.pieces, 2)):
      by_split["combos"].append(c)
      continue
    u = _hash_unit(f"composition|{c}")
    split = (
      "validation"
      if u < VALIDATION_FRACTION
      else "test"
      if u < VALIDATION_FRACTION + TEST_FRACTION
      else "train"
    )
    by_split[split].append(c)
  return {split: tuple(cs) for split, cs in by_split.items()}


_FAMILIES = {family.name: family for family in FAMILIES}


def _piece(pieces: Sequence[Piece], name: str) -> Piece:
  return next(p for p in pieces if p.name == name)


def _render(c: Composition, rng: random.Random, name: str) -> tuple[Task, Callable, str]:
  """The task of composition `c` with constants and phrasings from `rng` (no docstring and
  tests yet), its function (compiled, to compute the asserts) and its docstring line."""
  family = _FAMILIES[c.family]
  f = _piece(family.filters, c.filter)
  t = _piece(family.transforms, c.transform)
  r = REDUCES[c.reduce]
  v = family.var
  fk = rng.choice(f.ks) if f.ks else None
  tk = rng.choice(t.ks) if t.ks else None
  cond = f.code.format(v=v, k=fk)
  expr = t.code.format(v=v, k=tk) if t.code else v
  missing = "-1" if t.name == "length" else _MISSING[family.name]  # "first" finds nothing

  # the noun phrase: [transform] the <items> [filter]
  items = rng.choice(family.noun)
  np = f"the {items}"
  if f.code:
    np += " " + rng.choice(f.phrases).format(k=fk)
  if t.code:
    np = rng.choice(t.phrases).format(k=tk) + " " + np
  doc = rng.choice(r.phrases).format(np=np, missing=missing)
  name_parts = [rng.choice(r.words)]
  if t.code:
    name_parts.append(rng.choice(t.words).format(k=tk))
  if f.code:
    name_parts.append(rng.choice(f.words).format(k=fk))
  if rng.random() < 0.5:
    name_parts.append(_ARG_WORDS[c.family])
  entry = "_".join(name_parts)

  lines = list(r.init)
  lines.append(family.loop.format(v=v))
  body_indent = INDENT
  if cond:
    lines.append(INDENT + f"if {cond}:")
    body_indent += INDENT
  for update in r.update:
    lines.append(body_indent + update.format(e=expr))
  lines.append(r.after.format(missing=missing))
  body = "".join(INDENT + line + "\n" for line in lines)
  helper = f.helper
  source = (
    f"{helper}\n\ndef {entry}({family.arg}):\n" if helper else f"def {entry}({family.arg}):\n"
  )
  namespace: dict[str, Any] = {}
  exec(compile(source + body, "<task>", "exec"), namespace)  # our grammar's code only
  fn = namespace[entry]
  return Task(name, c, entry, source, body, ""), fn, doc


def _finish(task: Task, fn: Callable, doc: str, rng: random.Random) -> Task | None:
  """Docstring (with an example half the time) and asserts; None when the generated
  inputs do not tell answers apart or the function raised."""
  family = _FAMILIES[task.composition.family]
  for _ in range(20):
    args = [family.inputs(rng) for _ in range(ASSERTS + 1)]
    try:
      results = [fn(a) for a in args]
    except Exception:  # pylint: disable=broad-except
      return None
    if len({repr(x) for x in results[:ASSERTS]}) >= 2:
      break
  else:
    return None
  docstring = f'{INDENT}"""{doc}'
  if rng.random() < 0.5:
    docstring += (
      f"\n\n{INDENT}>>> {task.entry_point}({args[-1]!r})\n{INDENT}{results[-1]!r}\n{INDENT}"
    )
  docstring += '"""\n'
  tests = "".join(
    f"assert {task.entry_point}({a!r}) == {x!r}\n" for a, x in zip(args[:ASSERTS], results)
  )
  return dataclasses.replace(task, prompt=task.prompt + docstring, tests=tests)


@functools.lru_cache(maxsize=4096)
def generate(split: str, index: int, seed: int = 0) -> Task:
  """Task `index` of `split` (a pure function of its arguments)."""
  if split not in SPLITS:
    raise ValueError(f"Unknown task split {split!r}; valid choices: {SPLITS}.")
  pool = compositions()[split]
  for attempt in itertools.count():
    rng = random.Random(f"tasks|{seed}|{split}|{index}|{attempt}")
    c = rng.choice(pool)
    task, fn, doc = _render(c, rng, f"{split}/{index}")
    finished = _finish(task, fn, doc, rng)
    if finished is not None:
      return finished


class TaskCorpus(Sequence[str]):
  """The training documents of one split, generated on access (a `sources.Corpus` lookalike
  for the data pipeline, the tokenizer and the TFDS builder)."""

  def __init__(self, source: str, split: str, size: int, seed: int = 0):
    self.source, self.split, self.size, self.seed = source, split, size, seed

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(self.size))]
    if not -self.size <= index < self.size:
      raise IndexError(f"task {index} out of range [0, {self.size})")
    return self.task(index % self.size).text

  def task(self, index: int) -> Task:
    return generate(self.split, index, self.seed)

  @property
  def texts(self) -> TaskCorpus:
    return self

  @property
  def stats(self):
    """`sources.CorpusStats` of the split (generates every task)."""
    from sdiff_jax.data import sources  # pylint: disable=g-import-not-at-top  (a cycle)

    size = sum(len(text.encode("utf-8")) for text in self)
    return sources.CorpusStats(
      files=self.size, bytes=size, skipped_unreadable=0, skipped_non_utf8=0
    )

  @property
  def names(self) -> list[str]:
    return [f"{self.split}/{i}" for i in range(self.size)]


def is_source(source: str) -> bool:
  return source == "tasks" or source.startswith("tasks:")


def load(source: str, split: str) -> TaskCorpus:
  """The corpus of source "tasks" or "tasks:N" (N training tasks) for `split`."""
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r} of source {source!r}; valid choices: {SPLITS}.")
  size = TRAIN_SIZE
  if source != "tasks":
    try:
      size = int(source.split(":", 1)[1])
    except ValueError:
      size = 0
    if not 1 <= size <= MAX_SIZE:
      raise ValueError(f"source {source!r}: expected 'tasks' or 'tasks:N', 1 <= N <= {MAX_SIZE}")
  return TaskCorpus(source, split, size if split == "train" else EVAL_SIZE)
