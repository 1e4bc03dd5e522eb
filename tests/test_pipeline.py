"""Grain pipeline: batch layout, document reconstruction, sharding, exact resume."""

import itertools
import json
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from sdiff_jax.data import corpus_stats, pipeline, sources
from sdiff_jax.data import tokenizer as tokenizer_lib

SEQ_LEN, BATCH = 32, 4


def _texts(num_docs: int = 50, seed: int = 0, max_words: int = 40) -> list[str]:
  """Distinct documents from empty to several rows long, with non-ASCII text."""
  rng = np.random.default_rng(seed)
  words = ["def", "x", "\t", "\r\n", "  ", "é", "🐍", "return", "(", ")", "\n"]
  return [
    f"# doc {i}\n" + "".join(rng.choice(words, size=rng.integers(0, max_words)))
    for i in range(num_docs)
  ]


@pytest.fixture(scope="module")
def bpe() -> tokenizer_lib.BPETokenizer:
  return tokenizer_lib.train_bpe(_texts(200, seed=1), 300, show_progress=False)


def _batches(texts, tokenizer, **kwargs) -> list[dict[str, np.ndarray]]:
  kwargs = {
    "seq_len": SEQ_LEN,
    "batch_size": BATCH,
    "shuffle": False,
    "num_epochs": 1,
    "shard_index": 0,
    "shard_count": 1,
    **kwargs,
  }
  return list(pipeline.make_dataset(texts, tokenizer, **kwargs))


def _check_layout(batches) -> None:
  """Shapes, dtypes, padding and per-segment positions."""
  for batch in batches:
    assert set(batch) == {"tokens", "segment_ids", "positions"}
    for value in batch.values():
      assert value.shape == (BATCH, SEQ_LEN) and value.dtype == np.int32
    pad = batch["segment_ids"] == 0
    assert np.all(batch["tokens"][pad] == tokenizer_lib.PAD_ID)
    assert np.all(batch["positions"][pad] == 0)
    assert np.all(batch["tokens"][~pad] != tokenizer_lib.PAD_ID)
    for row_segments, row_positions in zip(batch["segment_ids"], batch["positions"]):
      real = row_segments[row_segments > 0]
      assert np.all(np.diff(real) >= 0) and (
        real.size == 0 or real[0] == 1
      )  # 1, 2, ... then padding
      assert np.all(row_segments[real.size :] == 0)
      for segment in np.unique(real):
        in_segment = row_segments == segment
        assert np.array_equal(row_positions[in_segment], np.arange(np.sum(in_segment)))


def _documents(batches) -> list[np.ndarray]:
  """Documents of an unshuffled pass: segments in stream order, split at BOS."""
  stream = np.concatenate(
    [
      batch["tokens"][row][batch["segment_ids"][row] > 0]
      for batch in batches
      for row in range(BATCH)
    ]
  )  # int32[T]
  starts = np.flatnonzero(stream == tokenizer_lib.BOS_ID)
  assert starts[0] == 0
  return np.split(stream, starts[1:])


@pytest.mark.parametrize("packing", pipeline.PACKINGS)
@pytest.mark.parametrize("kind", ("byte", "bpe"))  # "hf": test_convert.py
def test_segments_reconstruct_the_corpus(packing, kind, bpe):
  tokenizer = bpe if kind == "bpe" else tokenizer_lib.ByteTokenizer()
  texts = _texts()
  batches = _batches(texts, tokenizer, packing=packing)
  _check_layout(batches)
  documents = _documents(batches)
  assert all(doc[-1] == tokenizer_lib.EOS_ID for doc in documents)
  assert [tokenizer.decode(doc) for doc in documents] == texts
  segments = np.concatenate([batch["segment_ids"] for batch in batches])  # int32[R, L]
  if packing == "pad":
    assert segments.max() == 1
  else:
    real_rows = segments[
      segments[:, 0] > 0
    ]  # int32[R', L]; the last batch is filled up with empty rows
    assert segments.max() > 1 and np.all(real_rows[:-1] > 0)  # only the last real row has padding


def test_shuffled_epochs_have_every_token_once():
  texts = _texts()
  tokenizer = tokenizer_lib.ByteTokenizer()
  plain = _batches(texts, tokenizer)
  shuffled = _batches(texts, tokenizer, shuffle=True, seed=3, num_epochs=2)
  _check_layout(shuffled)
  count = lambda bs: np.bincount(np.concatenate([b["tokens"].ravel() for b in bs]), minlength=260)[
    1:
  ]
  assert np.array_equal(2 * count(plain), count(shuffled))
  assert not np.array_equal(plain[0]["tokens"], shuffled[0]["tokens"])
  reseeded = _batches(texts, tokenizer, shuffle=True, seed=4)
  assert not np.array_equal(reseeded[0]["tokens"], shuffled[0]["tokens"])


def test_epochs_and_final_padded_batch(monkeypatch):
  monkeypatch.setattr(pipeline, "SHUFFLE_WINDOW_ROWS", 64)
  texts = _texts(7)
  tokenizer = tokenizer_lib.ByteTokenizer()
  one = _batches(texts, tokenizer, packing="pad")
  two = _batches(texts, tokenizer, packing="pad", num_epochs=2)
  rows = sum(int(np.sum(b["segment_ids"][:, 0] > 0)) for b in one)
  assert len(one) == -(-rows // BATCH) and len(two) == -(-2 * rows // BATCH)
  if rows % BATCH:
    assert np.all(one[-1]["segment_ids"][rows % BATCH :] == 0)
  forever = iter(pipeline.make_dataset(texts, tokenizer, seq_len=SEQ_LEN, batch_size=BATCH))
  assert len(list(itertools.islice(forever, 5 * len(two)))) == 5 * len(two)


def test_shards_are_disjoint_and_cover_the_corpus():
  texts = _texts()
  tokenizer = tokenizer_lib.ByteTokenizer()
  seen = []
  for shard in range(3):
    docs = _documents(_batches(texts, tokenizer, shard_index=shard, shard_count=3))
    seen.append({tokenizer.decode(doc) for doc in docs})
  assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
  assert seen[0] | seen[1] | seen[2] == set(texts)
  default = _batches(texts, tokenizer, shard_index=None, shard_count=None)  # one JAX process
  assert len(default) == len(_batches(texts, tokenizer))
  with pytest.raises(ValueError, match="shard"):
    _batches(texts, tokenizer, shard_index=3, shard_count=3)


@pytest.mark.parametrize("packing", pipeline.PACKINGS)
@pytest.mark.parametrize(
  "window, points",
  [(64, [0, 1, 2, 3, 7, 19, 40, 77, 100]), (pipeline.SHUFFLE_WINDOW_ROWS, [0, 250, 260])],
)
def test_resume_is_exact(packing, window, points, monkeypatch):
  """Restores at many points, also inside and across shuffle windows and epochs."""
  monkeypatch.setattr(pipeline, "SHUFFLE_WINDOW_ROWS", window)
  texts = _texts(
    30, max_words=300
  )  # long documents: few epochs a window (each costs an index_shuffle setup)
  tokenizer = tokenizer_lib.ByteTokenizer()
  make = lambda: pipeline.make_dataset(
    texts,
    tokenizer,
    seq_len=SEQ_LEN,
    batch_size=BATCH,
    packing=packing,
    seed=7,
    shard_index=0,
    shard_count=1,
  )
  reference = list(itertools.islice(iter(make()), points[-1] + 12))  # several epochs
  for n in points:
    it = iter(make())
    for _ in range(n):
      next(it)
    state = pipeline.iterator_state(it)  # after a JSON round trip
    resumed = iter(make())
    pipeline.restore_iterator_state(resumed, state)
    for expected in reference[n : n + 12]:
      got, cont = next(resumed), next(it)
      for key in expected:
        assert np.array_equal(got[key], expected[key]) and np.array_equal(
          cont[key], expected[key]
        ), (n, key)


def test_bad_packing():
  with pytest.raises(ValueError, match=r"'pack', 'pad'"):
    _batches(_texts(), tokenizer_lib.ByteTokenizer(), packing="bucket")


def _config(directory: str, **overrides) -> ml_collections.ConfigDict:
  fields = {
    "source": directory,
    "valid_fraction": 0.2,
    "tokenizer": "byte",
    "vocab_size": 260,
    "seq_len": SEQ_LEN,
    "packing": "pack",
    "backend": "grain",
    "tfds_data_dir": "",
  }
  return ml_collections.ConfigDict({**fields, **overrides})


def test_from_config(tmp_path):
  for i, text in enumerate(_texts(40)):
    (tmp_path / f"m{i}.py").write_text(text)
  tokenizer = tokenizer_lib.ByteTokenizer()
  config = _config(str(tmp_path))
  valid = list(
    pipeline.make_dataset_from_config(
      config, tokenizer, "validation", batch_size=BATCH, seed=0, num_epochs=1
    )
  )
  _check_layout(valid)
  corpus = sources.load_corpus(str(tmp_path), "validation", 0.2)
  assert [tokenizer.decode(doc) for doc in _documents(valid)] == list(corpus)
  train = iter(
    pipeline.make_dataset_from_config(config, tokenizer, "train", batch_size=BATCH, seed=0)
  )
  _check_layout([next(train) for _ in range(3)])
  for field, value in [
    ("packing", "bucket"),
    ("tokenizer", "chars"),
    ("backend", "tf.data"),
    ("seq_len", 0),
    ("valid_fraction", 1.5),
    ("source", ""),
    ("tfds_data_dir", ""),
  ]:
    overrides = {field: value, "backend": "tfds"} if field == "tfds_data_dir" else {field: value}
    with pytest.raises(ValueError, match=f"config.data.{field}"):
      pipeline.make_dataset_from_config(
        _config(str(tmp_path), **overrides), tokenizer, "train", batch_size=2, seed=0
      )
  with pytest.raises(ValueError, match="does not match"):
    bpe_config = _config(str(tmp_path), tokenizer="bpe", vocab_size=300)
    pipeline.make_dataset_from_config(bpe_config, tokenizer, "train", batch_size=2, seed=0)


def test_prepare_cli_writes_the_tokenizer_and_the_corpus_statistics(tmp_path, monkeypatch):
  code = tmp_path / "code"
  code.mkdir()
  for i, text in enumerate(_texts(30, max_words=300)):
    (code / f"m{i}.py").write_text(text)
  work = tmp_path / "work"
  args = [
    f"--source={code}",
    f"--workdir={work}",
    "--tokenizer=bpe",
    "--vocab_size=300",
    "--valid_fraction=0.2",
    "--seq_len=32",
    "--throughput_seconds=0.2",
  ]
  cli = [sys.executable, "-m", "sdiff_jax.data.prepare", *args]
  done = subprocess.run(cli, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert "tokenizer built" in done.stdout
  saved = json.loads((work / corpus_stats.STATS_FILE).read_text())
  assert saved["tokenizer_built"] and saved["throughput"]["tokens_per_s"] > 0
  train = saved["splits"]["train"]
  assert train["files"] == len(sources.load_corpus(str(code), "train", 0.2))
  assert train["byte_tokens"] == train["bytes"] and 0 < train["bpe_tokens"] < train["bytes"]
  # the library gives the same counts with the tokenizer the CLI saved
  monkeypatch.setattr(pipeline, "SHUFFLE_WINDOW_ROWS", 64)
  tokenizer = tokenizer_lib.load_tokenizer(work / "tokenizer")
  config = _config(str(code), tokenizer="bpe", vocab_size=300)
  result = corpus_stats.corpus_statistics(
    config, tokenizer, batch_size=BATCH, throughput_seconds=0.2, progress=False
  )
  assert result["splits"] == saved["splits"] and result["vocab_size"] == 300
