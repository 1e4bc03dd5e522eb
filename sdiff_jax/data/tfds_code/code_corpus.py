"""`code_corpus`: a TFDS GeneratorBasedBuilder over a local source (no download step).

The source string has `sources.load_corpus` semantics and is carried by the
builder config, whose name is a hash of the resolved source and the validation
fraction, so different sources live side by side in one data_dir. A built
config is not rebuilt when its files change: delete its folder to rebuild.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

from sdiff_jax.data import sources, tasks

SPLITS = ("train", "validation")


@dataclasses.dataclass(eq=False)
class CodeCorpusConfig(tfds.core.BuilderConfig):
  """Which local corpus to build: `source` as in `sources.load_corpus`."""

  source: str = "stdlib"
  valid_fraction: float = 0.05


def config_for_source(source: str, valid_fraction: float = 0.05) -> CodeCorpusConfig:
  """A builder config named by a hash of the resolved source and `valid_fraction`."""
  if source == "stdlib":
    resolved = str(sources.stdlib_root())
  elif tasks.is_source(source):
    resolved = f"{source}@v{tasks.VERSION}"  # generated: rebuilt when the generator changes
  else:
    resolved = os.path.abspath(os.path.expanduser(source))
  digest = hashlib.blake2b(f"{resolved}|{valid_fraction!r}".encode(), digest_size=6).hexdigest()
  return CodeCorpusConfig(
    name=f"src_{digest}",
    description=f"{source} ({resolved}), valid_fraction={valid_fraction}",
    source=source if source == "stdlib" or tasks.is_source(source) else resolved,
    valid_fraction=valid_fraction,
  )


class CodeCorpus(tfds.core.GeneratorBasedBuilder):
  """Code files with their relative paths, split by a hash of the path."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Text and path of each document."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Source files of a local code corpus.",
      features=tfds.features.FeaturesDict(
        {"text": tfds.features.Text(), "path": tfds.features.Text()}
      ),
      disable_shuffling=True,  # records keep `load_corpus` order
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    del dl_manager  # local files only
    if tasks.is_source(self.builder_config.source):
      splits = tasks.SPLITS
    else:
      splits = SPLITS if self.builder_config.valid_fraction > 0 else SPLITS[:1]
    return {split: self._generate_examples(split) for split in splits}

  def _generate_examples(self, split: str):
    corpus = sources.load_corpus(
      self.builder_config.source, split, self.builder_config.valid_fraction
    )
    for name, text in zip(corpus.names, corpus.texts):
      yield name, {"text": text, "path": name}


class TfdsTexts(Sequence[str]):
  """A TFDS data source seen as a random-access sequence of texts."""

  def __init__(self, data_source: Sequence[dict[str, Any]]):
    self._source = data_source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> str:
    if not 0 <= index < len(self._source):
      raise IndexError(f"index {index} out of range [0, {len(self._source)})")
    return self._source[index]["text"].decode("utf-8")

  @property
  def names(self) -> list[str]:
    """Relative paths of the documents, in order (reads every record)."""
    return [self._source[i]["path"].decode("utf-8") for i in range(len(self))]


def build_tfds_corpus(
  source: str, data_dir: str | os.PathLike[str], valid_fraction: float = 0.05
) -> dict[str, TfdsTexts]:
  """Builds `source` as ArrayRecord under `data_dir` (once) and returns its texts by split.

  Keys: "train", "validation" (when valid_fraction > 0) and "all".
  """
  builder = CodeCorpus(
    config=config_for_source(source, valid_fraction),
    data_dir=os.fspath(data_dir),
    file_format="array_record",
  )
  builder.download_and_prepare()
  splits = list(builder.info.splits)
  texts = {split: TfdsTexts(builder.as_data_source(split)) for split in splits}
  texts["all"] = TfdsTexts(builder.as_data_source("+".join(splits)))
  return texts
