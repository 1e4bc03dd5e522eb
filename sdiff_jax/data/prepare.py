r"""Prepares a corpus: tokenizer, statistics, pipeline throughput (and the TFDS build).

    python -m sdiff_jax.data.prepare --source=stdlib --workdir=/tmp/sdiff \
        --tokenizer=bpe --vocab_size=4096 [--backend=tfds]

Builds (or loads) the tokenizer in WORKDIR/tokenizer, where training finds it,
and writes the statistics (`data.corpus_stats.corpus_statistics`) to
WORKDIR/corpus_stats.json.
"""

import json
import os
import sys
import time

import ml_collections
from absl import app, flags

from sdiff_jax import checkpointing
from sdiff_jax.data import corpus_stats, pipeline, sources
from sdiff_jax.data import tokenizer as tokenizer_lib

_SOURCE = flags.DEFINE_string(
  "source", "stdlib", "stdlib, a directory, a glob or a .jsonl[.gz] file."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "The tokenizer and corpus_stats.json go here.")
_TOKENIZER = flags.DEFINE_enum("tokenizer", "bpe", tokenizer_lib.KINDS, "Tokenizer kind.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 4096, "BPE vocabulary size, specials included.")
_MAX_BYTES = flags.DEFINE_integer(
  "tokenizer_max_bytes", 0, "The BPE learns from the first this many bytes (0: all)."
)
_VALID_FRACTION = flags.DEFINE_float("valid_fraction", 0.05, "Files held out for validation.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Tokens per row of the pipeline.")
_PACKING = flags.DEFINE_enum("packing", "pack", pipeline.PACKINGS, "Rows packed or padded.")
_BACKEND = flags.DEFINE_enum("backend", "grain", pipeline.BACKENDS, "Input pipeline backend.")
_TFDS_DATA_DIR = flags.DEFINE_string(
  "tfds_data_dir", "", "TFDS build directory (default: WORKDIR/tfds)."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Rows per batch of the throughput measurement.")
_THROUGHPUT_SECONDS = flags.DEFINE_float(
  "throughput_seconds", 3.0, "How long the pipeline throughput is measured."
)
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  workdir = checkpointing.Workdir(_WORKDIR.value)
  data_config = ml_collections.ConfigDict(
    {
      "source": _SOURCE.value,
      "valid_fraction": _VALID_FRACTION.value,
      "tokenizer": _TOKENIZER.value,
      "vocab_size": _VOCAB_SIZE.value,
      "seq_len": _SEQ_LEN.value,
      "packing": _PACKING.value,
      "backend": _BACKEND.value,
      "tfds_data_dir": _TFDS_DATA_DIR.value or workdir.tfds,
    }
  )
  try:
    result = _prepare(
      workdir,
      data_config,
      batch_size=_BATCH_SIZE.value,
      throughput_seconds=_THROUGHPUT_SECONDS.value,
      max_bytes=_MAX_BYTES.value,
    )
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(corpus_stats.format_statistics(result))
  path = os.path.join(workdir.path, corpus_stats.STATS_FILE)
  os.makedirs(workdir.path, exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {path}")


def _prepare(
  workdir: checkpointing.Workdir,
  data_config: ml_collections.ConfigDict,
  *,
  batch_size: int,
  throughput_seconds: float,
  max_bytes: int = 0,
) -> dict:
  """Builds or loads the workdir's tokenizer, then `corpus_statistics` and how the tokenizer came."""
  pipeline.validate_data_config(data_config)
  built = not os.path.exists(os.path.join(workdir.tokenizer, tokenizer_lib.META_FILE))
  start = time.perf_counter()
  tokenizer = tokenizer_lib.get_or_build_tokenizer(
    workdir.tokenizer,
    data_config.tokenizer,
    data_config.vocab_size,
    lambda: sources.load_corpus(data_config.source, "train", data_config.valid_fraction),
    max_bytes,
  )
  tokenizer_s = time.perf_counter() - start
  print(
    f"tokenizer {'built' if built else 'loaded'} in {tokenizer_s:.1f}s: {workdir.tokenizer}",
    flush=True,
  )
  result = corpus_stats.corpus_statistics(
    data_config, tokenizer, batch_size=batch_size, throughput_seconds=throughput_seconds
  )
  return {
    **result,
    "tokenizer_dir": workdir.tokenizer,
    "tokenizer_built": built,
    "tokenizer_seconds": tokenizer_s,
  }


def run():
  """Console-script entry point (sdiff-prepare)."""
  app.run(main)


if __name__ == "__main__":
  run()
