"""Code corpora held in memory, split deterministically by a hash of each document's name.

A source is one of:
  * "stdlib": the `.py` files of the running interpreter's standard library;
  * a directory: its `.py` files, recursively;
  * a glob pattern (`**` recurses): every matching file;
  * a `.jsonl` / `.jsonl.gz` file: one JSON object per line with a `text` field,
    named by its `id` or `path` field, else by its line index;
  * a single file;
  * "tasks" or "tasks:N": the generated task testbed (`tasks.py`), whose splits are
    `tasks.SPLITS` (decided by each task's composition, not by valid_fraction).
Names are paths relative to the source root (POSIX separators), so a file gets
the same split on every machine. Unreadable and non-UTF-8 documents are skipped
and counted.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import json
import os
import pathlib
import sysconfig
from collections.abc import Callable, Sequence

from sdiff_jax.data import tasks

SPLITS = ("train", "validation", "all")
DIRECTORY_SUFFIXES = (".py",)  # files taken from "stdlib" and directory sources
SKIPPED_DIRS = ("site-packages", "dist-packages", "__pycache__")
_GLOB_CHARS = frozenset("*?[")


@dataclasses.dataclass(frozen=True)
class CorpusStats:
  """Counts for one split; skipped documents are counted in the split their name hashes to."""

  files: int
  bytes: int  # UTF-8 bytes of the kept documents
  skipped_unreadable: int
  skipped_non_utf8: int


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus(Sequence[str]):
  """Random-access texts of one split, with their names and counts."""

  source: str
  split: str
  names: list[str]
  texts: list[str]
  stats: CorpusStats

  def __len__(self) -> int:
    return len(self.texts)

  def __getitem__(self, index):
    return self.texts[index]


def is_validation(name: str, valid_fraction: float) -> bool:
  """Whether document `name` belongs to the validation split (stable blake2b hash)."""
  digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "big") < valid_fraction * 2**64


def stdlib_root() -> pathlib.Path:
  """The running interpreter's standard-library directory."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _walk(root: pathlib.Path) -> list[pathlib.Path]:
  """Source files under `root`, recursively, skipping installed packages and caches."""
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS]
    paths.extend(pathlib.Path(dirpath, f) for f in filenames if f.endswith(DIRECTORY_SUFFIXES))
  return paths


def _glob_root(pattern: str) -> pathlib.Path:
  """The longest leading directory of `pattern` without glob characters."""
  parts = pathlib.Path(pattern).parts
  fixed = []
  for part in parts[:-1]:
    if _GLOB_CHARS & set(part):
      break
    fixed.append(part)
  return pathlib.Path(*fixed) if fixed else pathlib.Path(".")


def _file_entries(source: str) -> tuple[pathlib.Path, list[pathlib.Path]]:
  """(root, files) of a non-JSONL source."""
  if source == "stdlib":
    root = stdlib_root()
    return root, _walk(root)
  if _GLOB_CHARS & set(source):
    paths = [pathlib.Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True)]
    paths = [p for p in paths if p.is_file()]
    if not paths:
      raise FileNotFoundError(f"No files match corpus source {source!r}.")
    return _glob_root(os.path.expanduser(source)), paths
  path = pathlib.Path(source).expanduser()
  if path.is_dir():
    return path, _walk(path)
  if path.is_file():
    return path.parent, [path]
  raise FileNotFoundError(f"Corpus source {source!r} does not exist.")


class _Collector:
  """Accumulates the documents of one split and the skip counts."""

  def __init__(self, keep: Callable[[str], bool]):
    self.keep = keep
    self.names: list[str] = []
    self.texts: list[str] = []
    self.num_bytes = 0
    self.unreadable = 0
    self.non_utf8 = 0

  def add(self, name: str, data: bytes | str | None) -> None:
    """Adds a document given as bytes or str; None means unreadable."""
    if data is None:
      self.unreadable += 1
      return
    try:
      text = data.decode("utf-8") if isinstance(data, bytes) else data
      self.num_bytes += len(text.encode("utf-8"))  # fails on lone surrogates from JSON escapes
    except UnicodeError:
      self.non_utf8 += 1
      return
    self.names.append(name)
    self.texts.append(text)


def _read_files(root: pathlib.Path, paths: list[pathlib.Path], collector: _Collector) -> None:
  named = sorted((p.relative_to(root).as_posix(), p) for p in paths)
  for name, path in named:
    if not collector.keep(name):
      continue
    try:
      data = path.read_bytes()
    except OSError:
      data = None
    collector.add(name, data)


def _read_jsonl(path: pathlib.Path, collector: _Collector) -> None:
  opener = gzip.open if path.name.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      lines = f.read().splitlines()
  except (OSError, EOFError) as e:
    raise OSError(f"Cannot read corpus source {str(path)!r}: {e}") from e
  for index, line in enumerate(lines):
    if not line.strip():
      continue
    name = str(index)
    try:
      record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
      if collector.keep(name):
        collector.add(name, line)  # counted as non-UTF-8
      continue
    except ValueError:
      record = None
    if isinstance(record, dict):
      name = str(record.get("id", record.get("path", index)))
    if not collector.keep(name):
      continue
    text = record.get("text") if isinstance(record, dict) else None
    collector.add(name, text if isinstance(text, str) else None)


def splits_of(source: str) -> tuple[str, ...]:
  """The splits `load_corpus` knows for `source`."""
  return tasks.SPLITS if tasks.is_source(source) else SPLITS


def load_corpus(
  source: str = "stdlib", split: str = "train", valid_fraction: float = 0.05
) -> Corpus | tasks.TaskCorpus:
  """Reads one split ("train", "validation" or "all") of `source` into memory (the task
  testbed's splits are generated on access)."""
  if tasks.is_source(source):
    return tasks.load(source, split)
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; valid choices: {SPLITS}.")
  if not 0.0 <= valid_fraction < 1.0:
    raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}.")
  if split == "all":
    keep = lambda name: True
  else:
    want_validation = split == "validation"
    keep = lambda name: is_validation(name, valid_fraction) == want_validation
  collector = _Collector(keep)
  if source.endswith((".jsonl", ".jsonl.gz")) and not _GLOB_CHARS & set(source):
    path = pathlib.Path(source).expanduser()
    if not path.is_file():
      raise FileNotFoundError(f"Corpus source {source!r} does not exist.")
    _read_jsonl(path, collector)
  else:
    _read_files(*_file_entries(source), collector)
  stats = CorpusStats(
    files=len(collector.texts),
    bytes=collector.num_bytes,
    skipped_unreadable=collector.unreadable,
    skipped_non_utf8=collector.non_utf8,
  )
  if not collector.texts:
    raise ValueError(
      f"Corpus source {source!r} has no readable documents in split {split!r} ({stats})."
    )
  return Corpus(
    source=source, split=split, names=collector.names, texts=collector.texts, stats=stats
  )
