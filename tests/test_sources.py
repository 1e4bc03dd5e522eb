"""Corpus sources: splits, skips, errors, JSONL."""

import gzip
import json
import os
import pathlib
import shutil

import pytest

from sdiff_jax.data import sources


def _write_tree(root: pathlib.Path, num_files: int = 60) -> None:
  """`num_files` .py files in nested folders plus files the loader must skip or ignore."""
  for i in range(num_files):
    path = root / f"pkg{i % 4}" / f"sub{i % 3}" / f"mod_{i}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"x = {i}\n")
  (root / "notes.txt").write_text("not source")
  (root / "site-packages").mkdir()
  (root / "site-packages" / "installed.py").write_text("y = 1\n")
  (root / "__pycache__").mkdir()
  (root / "__pycache__" / "cached.py").write_text("z = 1\n")
  (root / "latin1.py").write_bytes(b"s = '\xe9t\xe9'\n")
  os.symlink(root / "does_not_exist.py", root / "broken.py")


@pytest.fixture
def tree(tmp_path: pathlib.Path) -> pathlib.Path:
  root = tmp_path / "code"
  _write_tree(root)
  return root


def test_splits_deterministic_disjoint_and_complete(tree):
  train = sources.load_corpus(str(tree), "train", valid_fraction=0.3)
  valid = sources.load_corpus(str(tree), "validation", valid_fraction=0.3)
  everything = sources.load_corpus(str(tree), "all", valid_fraction=0.3)
  assert not set(train.names) & set(valid.names)
  assert sorted(train.names + valid.names) == sorted(everything.names)
  assert len(everything) == 60 and 5 <= len(valid) <= 35
  assert sources.load_corpus(str(tree), "train", valid_fraction=0.3).names == train.names
  assert all(text == f"x = {name.split('_')[-1][:-3]}\n" for name, text in zip(train.names, train))
  assert train.stats.files == len(train) and train.stats.bytes == sum(len(t) for t in train)


def test_same_split_for_same_relative_path_under_other_root(tree, tmp_path):
  other = tmp_path / "elsewhere" / "deeper"
  shutil.copytree(tree, other, symlinks=True)
  first = sources.load_corpus(str(tree), "validation", valid_fraction=0.3)
  second = sources.load_corpus(str(other), "validation", valid_fraction=0.3)
  assert first.names == second.names and first.texts == second.texts
  assert all(not name.startswith("/") for name in first.names)


def test_skipped_files_are_counted(tree):
  corpus = sources.load_corpus(str(tree), "all")
  assert corpus.stats.skipped_non_utf8 == 1
  assert corpus.stats.skipped_unreadable == 1
  assert not any(
    "site-packages" in n or "__pycache__" in n or n.endswith(".txt") for n in corpus.names
  )
  train = sources.load_corpus(str(tree), "train", valid_fraction=0.5)
  valid = sources.load_corpus(str(tree), "validation", valid_fraction=0.5)
  assert train.stats.skipped_non_utf8 + valid.stats.skipped_non_utf8 == 1
  assert train.stats.skipped_unreadable + valid.stats.skipped_unreadable == 1


def test_glob_source(tree):
  corpus = sources.load_corpus(str(tree / "pkg1" / "**" / "*.py"), "all")
  assert len(corpus) == 15 and all(
    name.startswith("sub") for name in corpus.names
  )  # relative to pkg1/


def test_missing_and_empty_sources_name_the_path(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError, match="nowhere"):
    sources.load_corpus(str(missing))
  with pytest.raises(FileNotFoundError, match="nowhere"):
    sources.load_corpus(str(missing / "*.py"))
  with pytest.raises(FileNotFoundError, match="nowhere"):
    sources.load_corpus(str(missing) + ".jsonl")
  empty = tmp_path / "empty_dir"
  empty.mkdir()
  (empty / "README.md").write_text("no code")
  with pytest.raises(ValueError, match="empty_dir"):
    sources.load_corpus(str(empty))


def test_bad_arguments(tree):
  with pytest.raises(ValueError, match="split"):
    sources.load_corpus(str(tree), "test")
  with pytest.raises(ValueError, match="valid_fraction"):
    sources.load_corpus(str(tree), valid_fraction=1.0)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_jsonl_source(tmp_path, suffix):
  lines = [json.dumps({"text": f"def f{i}():\n  return {i}\n", "id": f"doc{i}"}) for i in range(30)]
  lines += [
    json.dumps({"text": "by path", "path": "a/b.py"}),
    json.dumps({"text": "by line"}),
    "",
    "{not json",
    json.dumps({"id": "no_text"}),
    json.dumps({"text": 7, "id": "int_text"}),
    '{"text": "lone \\ud800 surrogate", "id": "surrogate"}',
  ]
  data = "\n".join(lines).encode() + b"\n" + b'{"text": "\xff"}\n'
  path = tmp_path / f"corpus{suffix}"
  path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
  corpus = sources.load_corpus(str(path), "all")
  assert corpus.names == [f"doc{i}" for i in range(30)] + ["a/b.py", "31"]
  assert corpus[0] == "def f0():\n  return 0\n" and corpus[-1] == "by line"
  assert corpus.stats.skipped_unreadable == 3  # bad JSON, missing text, non-string text
  assert corpus.stats.skipped_non_utf8 == 2  # lone surrogate, invalid byte
  train = sources.load_corpus(str(path), "train", valid_fraction=0.3)
  valid = sources.load_corpus(str(path), "validation", valid_fraction=0.3)
  assert sorted(train.names + valid.names) == sorted(corpus.names)


def test_default_stdlib_corpus():
  corpus = sources.load_corpus("stdlib", "all")
  assert len(corpus) > 500 and corpus.stats.bytes > 5_000_000
  assert all(name.endswith(".py") and "site-packages" not in name for name in corpus.names)
  assert len(corpus.names) == len(set(corpus.names))
