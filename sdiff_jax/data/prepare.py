"""Prepares a corpus: tokenizer, statistics, pipeline throughput (and the TFDS build).

Command to run:
  python -m sdiff_jax.data.prepare --source=stdlib --workdir=/tmp/sdiff \
      --tokenizer=bpe --vocab_size=4096 [--backend=tfds]
Writes the tokenizer to WORKDIR/tokenizer and the statistics to
WORKDIR/corpus_stats.json. The CLI uses argparse, not absl flags, so that the
training binary can import `corpus_statistics` without flag clashes.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
import tqdm

from sdiff_jax.data import pipeline
from sdiff_jax.data import sources
from sdiff_jax.data import tokenizer as tokenizer_lib

TOKENIZER_SUBDIR = "tokenizer"
STATS_FILE = "corpus_stats.json"


def tokenizer_dir(workdir: str | pathlib.Path) -> pathlib.Path:
  """Where a run keeps its tokenizer."""
  return pathlib.Path(workdir) / TOKENIZER_SUBDIR


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
  it = iter(pipeline.make_dataset_from_config(data_config, tokenizer, "train", batch_size=batch_size, seed=0))
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


def _format(result: dict[str, Any]) -> str:
  """Human-readable lines of `corpus_statistics` output."""
  lines = [f"source={result['source']} tokenizer={result['tokenizer']} vocab_size={result['vocab_size']}"]
  for split, stats in result["splits"].items():
    line = (
        f"  {split:10s} files={stats['files']} bytes={stats['bytes']} "
        f"skipped_unreadable={stats['skipped_unreadable']} skipped_non_utf8={stats['skipped_non_utf8']} "
        f"byte_tokens={stats['byte_tokens']}"
    )
    if "bpe_tokens" in stats:
      line += f" bpe_tokens={stats['bpe_tokens']} bytes_per_bpe_token={stats['bytes_per_bpe_token']:.3f}"
    lines.append(line)
  t = result["throughput"]
  lines.append(
      f"  pipeline ({t['backend']}, batch {t['batch_size']}x{t['seq_len']}): "
      f"{t['tokens_per_s']:,.0f} tokens/s "
      f"({t['non_padding_tokens_per_s']:,.0f} non-padding), first batch after {t['startup_s']:.2f}s"
  )
  return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="sdiff-prepare", description=__doc__.splitlines()[0])
  parser.add_argument("--source", default="stdlib", help="stdlib, a directory, a glob or a .jsonl[.gz] file")
  parser.add_argument("--workdir", required=True, help="tokenizer and corpus_stats.json go here")
  parser.add_argument("--tokenizer", default="bpe", choices=tokenizer_lib.KINDS)
  parser.add_argument("--vocab_size", type=int, default=4096, help="BPE vocabulary size, specials included")
  parser.add_argument("--valid_fraction", type=float, default=0.05)
  parser.add_argument("--seq_len", type=int, default=512)
  parser.add_argument("--packing", default="pack", choices=pipeline.PACKINGS)
  parser.add_argument("--backend", default="grain", choices=pipeline.BACKENDS)
  parser.add_argument("--tfds_data_dir", default="", help="default: WORKDIR/tfds")
  parser.add_argument("--batch_size", type=int, default=8, help="for the throughput measurement")
  parser.add_argument("--throughput_seconds", type=float, default=3.0)
  return parser.parse_args(argv)


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """CLI entry point (`sdiff-prepare`); returns what it writes to WORKDIR/corpus_stats.json."""
  args = _parse_args(argv)
  workdir = pathlib.Path(args.workdir)
  data_config = ml_collections.ConfigDict({
      "source": args.source,
      "valid_fraction": args.valid_fraction,
      "tokenizer": args.tokenizer,
      "vocab_size": args.vocab_size,
      "seq_len": args.seq_len,
      "packing": args.packing,
      "backend": args.backend,
      "tfds_data_dir": args.tfds_data_dir or str(workdir / "tfds"),
  })
  pipeline.validate_data_config(data_config)
  directory = tokenizer_dir(workdir)
  built = not (directory / tokenizer_lib.META_FILE).exists()
  start = time.perf_counter()
  tokenizer = tokenizer_lib.get_or_build_tokenizer(
      directory,
      args.tokenizer,
      args.vocab_size,
      lambda: sources.load_corpus(args.source, "train", args.valid_fraction),
  )
  tokenizer_s = time.perf_counter() - start
  print(f"tokenizer {'built' if built else 'loaded'} in {tokenizer_s:.1f}s: {directory}", flush=True)
  result = corpus_statistics(
      data_config, tokenizer, batch_size=args.batch_size, throughput_seconds=args.throughput_seconds
  )
  result["tokenizer_dir"] = str(directory)
  result["tokenizer_built"] = built
  result["tokenizer_seconds"] = tokenizer_s
  print(_format(result))
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / STATS_FILE).write_text(json.dumps(result, indent=2))
  print(f"wrote {workdir / STATS_FILE}")
  return result


if __name__ == "__main__":
  run()
