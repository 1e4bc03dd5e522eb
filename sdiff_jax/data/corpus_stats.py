"""Corpus counts and pipeline throughput, the library behind `python -m sdiff_jax.data.prepare`.

`corpus_statistics` gives per-split counts (files, bytes, skipped files, byte and
BPE tokens) and the training pipeline's throughput, JSON-ready; `format_statistics`
prints them.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import tqdm

from sdiff_jax.data import pipeline, sources
from sdiff_jax.data import tokenizer as tokenizer_lib

STATS_FILE = "corpus_stats.json"  # what `sdiff-prepare` writes to the workdir


def _split_statistics(
  corpus: sources.Corpus, tokenizer: tokenizer_lib.Tokenizer, progress: bool
) -> dict[str, Any]:
  """Counts of one split; BPE tokens are counted by tokenizing every document."""
  stats = dict(vars(corpus.stats), byte_tokens=corpus.stats.bytes)
  if tokenizer.kind == "bpe":
    texts = tqdm.tqdm(
      corpus, desc=f"tokenizing {corpus.split}", unit="doc", mininterval=2.0, disable=not progress
    )
    stats["bpe_tokens"] = sum(len(tokenizer.encode_array(text)) for text in texts)
    stats["bytes_per_bpe_token"] = stats["bytes"] / max(stats["bpe_tokens"], 1)
  return stats


def pipeline_throughput(
  data_config: Any, tokenizer: tokenizer_lib.Tokenizer, *, batch_size: int, seconds: float
) -> dict[str, float]:
  """Tokens per second of the training pipeline over about `seconds` of batches.

  `startup_s`: from building the pipeline (corpus loading, TFDS build) to its
  first batch (which waits for the first shuffle window).
  """
  start = time.perf_counter()
  it = iter(
    pipeline.make_dataset_from_config(
      data_config, tokenizer, "train", batch_size=batch_size, seed=0
    )
  )
  next(it)
  startup_s = time.perf_counter() - start
  batches, real_tokens = 0, 0
  start = time.perf_counter()
  while time.perf_counter() - start < seconds:
    batch = next(it)
    batches += 1
    real_tokens += int(np.count_nonzero(batch["segment_ids"]))
  elapsed = time.perf_counter() - start
  return {
    "startup_s": startup_s,
    "batches_per_s": batches / elapsed,
    "tokens_per_s": batches * batch_size * data_config.seq_len / elapsed,
    "non_padding_tokens_per_s": real_tokens / elapsed,
    "batch_size": batch_size,
    "seq_len": data_config.seq_len,
  }


def corpus_statistics(
  data_config: Any,
  tokenizer: tokenizer_lib.Tokenizer,
  *,
  batch_size: int = 8,
  throughput_seconds: float = 3.0,
  progress: bool = True,
) -> dict[str, Any]:
  """Per-split corpus counts (files, bytes, skips, tokens) and pipeline throughput, JSON-ready."""
  pipeline.validate_data_config(data_config)
  result: dict[str, Any] = {
    "source": data_config.source,
    "valid_fraction": data_config.valid_fraction,
    "tokenizer": tokenizer.kind,
    "vocab_size": tokenizer.vocab_size,
    "splits": {},
  }
  for split in ("train", "validation"):
    try:
      corpus = sources.load_corpus(data_config.source, split, data_config.valid_fraction)
    except ValueError:  # empty split, e.g. valid_fraction == 0
      continue
    result["splits"][split] = _split_statistics(corpus, tokenizer, progress)
  result["throughput"] = pipeline_throughput(
    data_config, tokenizer, batch_size=batch_size, seconds=throughput_seconds
  )
  result["throughput"]["backend"] = data_config.backend
  return result


def format_statistics(result: dict[str, Any]) -> str:
  """Human-readable lines of `corpus_statistics` output."""
  lines = [
    f"source={result['source']} tokenizer={result['tokenizer']} vocab_size={result['vocab_size']}"
  ]
  for split, stats in result["splits"].items():
    line = (
      f"  {split:10s} files={stats['files']} bytes={stats['bytes']} "
      f"skipped_unreadable={stats['skipped_unreadable']} skipped_non_utf8={stats['skipped_non_utf8']} "
      f"byte_tokens={stats['byte_tokens']}"
    )
    if "bpe_tokens" in stats:
      line += (
        f" bpe_tokens={stats['bpe_tokens']} bytes_per_bpe_token={stats['bytes_per_bpe_token']:.3f}"
      )
    lines.append(line)
  t = result["throughput"]
  lines.append(
    f"  pipeline ({t['backend']}, batch {t['batch_size']}x{t['seq_len']}): "
    f"{t['tokens_per_s']:,.0f} tokens/s "
    f"({t['non_padding_tokens_per_s']:,.0f} non-padding), first batch after {t['startup_s']:.2f}s"
  )
  return "\n".join(lines)
