"""TFDS builder: builds local files into ArrayRecord, reads back the corpus splits, feeds the pipeline."""

import ml_collections
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from sdiff_jax.data import (
  pipeline,  # pylint: disable=g-import-not-at-top
  sources,
  tfds_code,
)
from sdiff_jax.data import tokenizer as tokenizer_lib

VALID_FRACTION = 0.25


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("code")
  for i in range(40):
    path = root / f"pkg{i % 3}" / f"mod_{i}.py"
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"def f{i}(x):\r\n\treturn x * {i}  # é 🐍\n" * (1 + i % 5))
  (root / "bad.py").write_bytes(b"\xff\xfe")
  return root


def test_builder_matches_load_corpus(code_dir, tmp_path):
  splits = tfds_code.build_tfds_corpus(str(code_dir), tmp_path / "tfds", VALID_FRACTION)
  assert set(splits) == {"train", "validation", "all"}
  for split, texts in splits.items():
    corpus = sources.load_corpus(str(code_dir), split, VALID_FRACTION)
    if split == "all":  # train records, then validation records
      assert sorted(zip(texts.names, texts)) == sorted(zip(corpus.names, corpus))
    else:
      assert texts.names == corpus.names and list(texts) == list(corpus)
  config_name = tfds_code.config_for_source(str(code_dir), VALID_FRACTION).name
  source = tfds.data_source(
    f"code_corpus/{config_name}", split="validation", data_dir=str(tmp_path / "tfds")
  )
  assert [record["text"].decode() for record in source] == list(splits["validation"])
  again = tfds_code.build_tfds_corpus(
    str(code_dir), tmp_path / "tfds", VALID_FRACTION
  )  # reuses the build
  assert list(again["train"]) == list(splits["train"])


def test_tfds_texts_feed_the_pipeline(code_dir, tmp_path):
  config = ml_collections.ConfigDict(
    {
      "source": str(code_dir),
      "valid_fraction": VALID_FRACTION,
      "tokenizer": "byte",
      "vocab_size": 260,
      "seq_len": 48,
      "packing": "pack",
      "backend": "tfds",
      "tfds_data_dir": str(tmp_path / "tfds"),
    }
  )
  tokenizer = tokenizer_lib.ByteTokenizer()
  make = lambda: list(
    pipeline.make_dataset_from_config(
      config, tokenizer, "train", batch_size=4, seed=0, num_epochs=1
    )
  )
  from_tfds = make()
  config.backend = "grain"
  from_files = make()
  assert len(from_tfds) == len(from_files) > 0
  for a, b in zip(from_tfds, from_files):
    for key in pipeline.FEATURES:
      np.testing.assert_array_equal(a[key], b[key])


def test_builder_writes_every_split_of_the_task_testbed(tmp_path, monkeypatch):
  from sdiff_jax.data import tasks  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(tasks, "EVAL_SIZE", 7)
  splits = tfds_code.build_tfds_corpus("tasks:30", tmp_path / "tfds")
  assert set(splits) == {*tasks.SPLITS, "all"}
  for split in tasks.SPLITS:
    corpus = sources.load_corpus("tasks:30", split)
    assert splits[split].names == corpus.names and list(splits[split]) == list(corpus)
  assert len(splits["train"]) == 30 and len(splits["combos"]) == 7
