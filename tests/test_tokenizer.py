"""Tokenizers: exact round trips on the default corpus, special ids, saving and loading."""

import json

import numpy as np
import pytest

from sdiff_jax.data import sources
from sdiff_jax.data import tokenizer as tokenizer_lib

EDGE_CASES = [
  "",
  "def f(x):\r\n\treturn x  \r\n",
  "    \n\n\n\t\t  \t \x0b\x0c trailing   ",
  "naïve café — 日本語 🐍 \u200b\ufeff",
  "<|pad|><|bos|> spelled specials <|eos|><|mask|>",
  "\x00\x01 control \x7f",
]


@pytest.fixture(scope="module")
def stdlib() -> sources.Corpus:
  return sources.load_corpus("stdlib", "all")


@pytest.fixture(scope="module")
def bpe(stdlib) -> tokenizer_lib.BPETokenizer:
  """Vocabulary 1000, trained on every 8th stdlib file (~4 MB)."""
  return tokenizer_lib.train_bpe(stdlib.texts[::8], 1000, show_progress=False)


def test_special_ids():
  ids = (tokenizer_lib.PAD_ID, tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID, tokenizer_lib.MASK_ID)
  assert ids == (0, 1, 2, 3)
  assert tokenizer_lib.NUM_SPECIAL == 4
  byte = tokenizer_lib.ByteTokenizer()
  assert byte.vocab_size == 260 and byte.kind == "byte"
  assert byte.encode("A\xff") == [65 + 4, 0xC3 + 4, 0xBF + 4]


def test_bpe_special_ids(bpe):
  assert bpe.kind == "bpe" and bpe.vocab_size == 1000
  ids = bpe.encode(EDGE_CASES[4])
  assert min(ids) >= tokenizer_lib.NUM_SPECIAL and max(ids) < bpe.vocab_size
  assert bpe.decode([1] + ids + [2, 3, 0]) == EDGE_CASES[4]


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_case_round_trips(bpe, text):
  for tokenizer in (tokenizer_lib.ByteTokenizer(), bpe):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode_array(text).dtype == np.int32


def test_byte_round_trip_every_stdlib_file(stdlib):
  byte = tokenizer_lib.ByteTokenizer()
  assert [n for n, t in zip(stdlib.names, stdlib) if byte.decode(byte.encode_array(t)) != t] == []


def test_bpe_round_trip_every_stdlib_file(stdlib, bpe):
  assert [n for n, t in zip(stdlib.names, stdlib) if bpe.decode(bpe.encode_array(t)) != t] == []


def test_decode_drops_out_of_range_ids(bpe):
  assert tokenizer_lib.ByteTokenizer().decode([0, 1, 4 + 104, 4 + 105, 2, 3, 999, -5]) == "hi"
  assert bpe.decode([0, 1, 999999, -1]) == ""


def test_save_load_round_trip(tmp_path, bpe):
  for tokenizer in (tokenizer_lib.ByteTokenizer(), bpe):
    directory = tmp_path / tokenizer.kind
    tokenizer.save(directory)
    loaded = tokenizer_lib.load_tokenizer(directory)
    assert (loaded.kind, loaded.vocab_size) == (tokenizer.kind, tokenizer.vocab_size)
    for text in EDGE_CASES:
      assert loaded.encode(text) == tokenizer.encode(text)
      assert loaded.decode(loaded.encode(text)) == text


def _fail():
  raise AssertionError("texts must not be read when the tokenizer exists")


def test_get_or_build(tmp_path):
  texts = ["def add(a, b):\n    return a + b\n" * 20, "class A:\n    pass\n" * 20]
  directory = tmp_path / "tok"
  built = tokenizer_lib.get_or_build_tokenizer(directory, "bpe", 300, lambda: texts)
  loaded = tokenizer_lib.get_or_build_tokenizer(directory, "bpe", 300, _fail)
  assert loaded.encode(texts[0]) == built.encode(texts[0]) and loaded.vocab_size == 300
  with pytest.raises(ValueError, match="vocab_size=300.*vocab_size=512"):
    tokenizer_lib.get_or_build_tokenizer(directory, "bpe", 512, _fail)
  with pytest.raises(ValueError, match="kind='bpe'.*kind='byte'"):
    tokenizer_lib.get_or_build_tokenizer(directory, "byte", 300, _fail)
  with pytest.raises(ValueError, match="valid choices"):
    tokenizer_lib.get_or_build_tokenizer(tmp_path / "other", "wordpiece", 300, _fail)
  byte = tokenizer_lib.get_or_build_tokenizer(tmp_path / "byte", "byte", 0, _fail)
  assert isinstance(tokenizer_lib.load_tokenizer(tmp_path / "byte"), tokenizer_lib.ByteTokenizer)
  assert byte.vocab_size == 260


def test_bad_vocab_size():
  with pytest.raises(ValueError, match="vocab_size"):
    tokenizer_lib.train_bpe(["abc"], 100)


def test_missing_and_corrupt_files_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing_here"):
    tokenizer_lib.load_tokenizer(tmp_path / "nothing_here")
  directory = tmp_path / "tok"
  tokenizer_lib.train_bpe(["x = 1\n" * 10], 270, show_progress=False).save(directory)
  (directory / tokenizer_lib.BPE_FILE).write_text('{"model": truncated')
  with pytest.raises(ValueError, match=str(directory / tokenizer_lib.BPE_FILE)):
    tokenizer_lib.load_tokenizer(directory)
  (directory / tokenizer_lib.META_FILE).write_text("{{{")
  with pytest.raises(ValueError, match=str(directory / tokenizer_lib.META_FILE)):
    tokenizer_lib.load_tokenizer(directory)
  (directory / tokenizer_lib.META_FILE).write_text(
    json.dumps({"kind": "sentencepiece", "vocab_size": 9})
  )
  with pytest.raises(ValueError, match="sentencepiece"):
    tokenizer_lib.load_tokenizer(directory)
