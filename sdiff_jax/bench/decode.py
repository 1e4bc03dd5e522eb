r"""Decoding speed: the AR baseline and block diffusion decoding on the same weights, JSON rows.

    python -m sdiff_jax.bench.decode --config=configs/quickstart.py --random_init \
        --batch=1,16 --prompt_len=64 --gen_len=256 --block_size=32 \
        --steps_per_block=1,2,4,8,32 --json=/tmp/decode.json
    python -m sdiff_jax.bench.decode --workdir=/tmp/sdiff_quickstart --batch=1 --json=/tmp/d.json

AR runs the same parameters with causal masks (one token per forward, KV
cache); block rows use the model's attention mode (`--attention` overrides).
EOS is suppressed so every row generates exactly `gen_len` tokens. Compile time
is measured apart (lower + compile); speed is the median of `repeats` timed
calls after warm-up. On an accelerator each row also gives the weight bytes
read per second (every forward reads all weights once) as a fraction of a
measured device-to-device copy bandwidth.
"""

import dataclasses
import json
import statistics
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from sdiff_jax import config_lib, sampling
from sdiff_jax.data import tokenizer as tokenizer_lib
from sdiff_jax.models import Transformer
from sdiff_jax.models.attention_masks import ATTENTION_MODES

_CONFIG = config_flags.DEFINE_config_file("config", None, "Model config (with --random_init).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Trained workdir (its config and checkpoint).")
_RANDOM_INIT = flags.DEFINE_bool("random_init", False, "Random parameters of --config's shape.")
_BATCH = flags.DEFINE_list("batch", ["1"], "Batch sizes.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per row.")
_GEN_LEN = flags.DEFINE_integer("gen_len", 256, "Generated tokens per row.")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", 32, "Block size of the block rows.")
_STEPS = flags.DEFINE_list("steps_per_block", ["1", "2", "4", "8", "32"], "Steps per block.")
_ATTENTION = flags.DEFINE_enum(
  "attention",
  None,
  [m for m in ATTENTION_MODES if m != "causal"],
  "Block rows' attention (default: the config's).",
)
_CACHE_MODE = flags.DEFINE_list(
  "cache_mode",
  ["fold"],
  f"Bidirectional block rows: K/V of finished blocks, one or more of {sampling.CACHE_MODES}.",
)
_SUFFIX_MASK = flags.DEFINE_bool(
  "suffix_mask", False, "Bidirectional block rows: forwards also see the rest as MASK."
)
_WINDOWS = flags.DEFINE_list(
  "cache_windows",
  ["0"],
  "Attention windows per generation (sampling.Settings.cache_windows; 0: automatic); "
  "several compare: speedups are against the AR row of the same value.",
)
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype override.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per row; the median is reported.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed calls after compiling.")
_JSON = flags.DEFINE_string("json", None, "Write the rows to this file as a JSON list.")


def _model(workdir: str | None, config, dtype: str | None) -> tuple[Any, Any, Any]:
  """(ModelConfig, params, config) of a trained `workdir`, or a random init of `config`."""
  if workdir:
    from sdiff_jax import inference  # imported here: random init runs without the data stack

    config, tok, params = inference.load_model(workdir)
    vocab = tok.vocab_size
  else:
    byte = config.data.tokenizer == "byte"
    vocab = tokenizer_lib.BYTE_VOCAB_SIZE if byte else config.data.vocab_size
    params = None
  if dtype:
    config.model.dtype = dtype
  cfg = config_lib.model_config(config, vocab)
  if params is None:
    tokens = jnp.zeros((1, 8), jnp.int32)
    init = jax.jit(
      lambda k: nn.meta.unbox(
        Transformer(cfg).init(k, tokens, tokens, jnp.ones((1, 8, 8), bool))["params"]
      )
    )
    params = init(jax.random.key(0))
  return cfg, params, config


def copy_bandwidth(num_bytes: int = 1 << 30) -> float:
  """Device-to-device copy bandwidth in bytes/s (read + write), median of 10 copies."""
  x = jnp.zeros((num_bytes // 4,), jnp.float32)
  copy = jax.jit(lambda x: x + 1.0)
  jax.block_until_ready(copy(x))
  times = []
  for _ in range(10):
    start = time.perf_counter()
    jax.block_until_ready(copy(x))
    times.append(time.perf_counter() - start)
  return 2 * num_bytes / statistics.median(times)


def time_settings(
  decoder,
  params,
  settings: list[sampling.Settings],
  batch: int,
  *,
  prompt_len: int,
  warmup: int,
  repeats: int,
) -> list[dict[str, Any]]:
  """Compile time, median decode time and statistics of each setting (`repeats` timed calls
  after `warmup` untimed ones, on random prompts of `prompt_len` tokens).

  The timed calls go round-robin over the settings, so that a load change on a
  shared machine hits all of them alike.
  """
  rng = np.random.default_rng(0)
  prompt_BxP = rng.integers(
    tokenizer_lib.NUM_SPECIAL, decoder.cfg.vocab_size, (batch, prompt_len)
  ).astype(np.int32)
  prompt_BxP[:, 0] = tokenizer_lib.BOS_ID
  lens_B = np.full((batch,), prompt_len, np.int32)
  key = jax.random.key(0)
  compiled, compile_s, gens = [], [], [None] * len(settings)
  for s in settings:
    start = time.perf_counter()
    compiled.append(sampling.compile_generate(decoder, params, prompt_BxP, lens_B, key, s))
    compile_s.append(time.perf_counter() - start)
    for _ in range(warmup):
      jax.block_until_ready(compiled[-1](params, prompt_BxP, lens_B, key))
  times = [[] for _ in settings]
  for _ in range(repeats):
    for i, fn in enumerate(compiled):
      start = time.perf_counter()
      gen = jax.block_until_ready(fn(params, prompt_BxP, lens_B, key))
      times[i].append(time.perf_counter() - start)
      gens[i] = gen
  results = []
  for s, gen, seconds, c in zip(settings, gens, times, compile_s):
    assert int(np.min(gen.lengths)) == s.max_new_tokens, "a row ended early"
    median_s, nfe = statistics.median(seconds), int(gen.nfe)
    results.append(
      {
        "compile_s": c,
        "median_s": median_s,
        "min_s": min(seconds),
        "repeats": len(seconds),
        "nfe": nfe,
        "tokens_per_s": batch * s.max_new_tokens / median_s,
        "tokens_per_forward": gen.tokens_per_forward,
        "ms_per_forward": 1e3 * median_s / nfe,
      }
    )
  return results


_COLUMNS = (  # header, key, format
  ("mode", "mode", "{}"),
  ("batch", "batch", "{}"),
  ("block", "block_size", "{}"),
  ("steps/block", "steps_per_block", "{}"),
  ("cache", "cache_mode", "{}"),
  ("windows", "cache_windows", "{}"),
  ("tokens/s", "tokens_per_s", "{:,.1f}"),
  ("speedup vs AR", "speedup_vs_ar", "{:.2f}x"),
  ("NFE", "nfe", "{}"),
  ("tokens/forward", "tokens_per_forward", "{:.2f}"),
  ("ms/forward", "ms_per_forward", "{:.2f}"),
  ("compile s", "compile_s", "{:.1f}"),
  ("roofline", "roofline_fraction", "{:.1%}"),
)


def markdown_header() -> str:
  return "| " + " | ".join(c[0] for c in _COLUMNS) + " |\n" + "|" + "---|" * len(_COLUMNS)


def markdown_row(row: dict[str, Any]) -> str:
  cells = ["-" if row.get(key) is None else fmt.format(row[key]) for _, key, fmt in _COLUMNS]
  return "| " + " | ".join(cells) + " |"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _RANDOM_INIT.value == bool(_WORKDIR.value):
    raise app.UsageError("pass exactly one of --workdir and --random_init")
  if _RANDOM_INIT.value and _CONFIG.value is None:
    raise app.UsageError("--random_init needs --config")
  cfg, params, config = _model(_WORKDIR.value, _CONFIG.value, _DTYPE.value)
  attention = _ATTENTION.value or config.attention
  if attention == "causal":
    raise app.UsageError("the config is an AR model: pass --attention for the block rows")
  decoder = sampling.Decoder(cfg)
  device = jax.devices()[0]
  on_accelerator = device.platform != "cpu"
  bandwidth = copy_bandwidth() if on_accelerator else None
  weight_bytes = jnp.dtype(cfg.compute_dtype).itemsize * (
    cfg.num_params() - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
  )
  common = {
    "device": device.device_kind,
    "platform": device.platform,
    "jax": jax.__version__,
    "params": cfg.num_params(),
    "dtype": cfg.dtype,
    "prompt_len": _PROMPT_LEN.value,
    "gen_len": _GEN_LEN.value,
    "weight_bytes": weight_bytes,
    "copy_bandwidth_bytes_per_s": bandwidth,
  }
  base = sampling.Settings(max_new_tokens=_GEN_LEN.value, suppress_eos=True)
  rows = []
  print(markdown_header())
  for batch in map(int, _BATCH.value):
    settings = []
    for windows in map(int, _WINDOWS.value):
      per = dataclasses.replace(base, cache_windows=windows)
      settings += [dataclasses.replace(per, attention="causal")] + [
        dataclasses.replace(
          per,
          attention=attention,
          shift=bool(config.diffusion.shift) and attention != "causal",
          cache_mode=cache_mode,
          suffix_mask=_SUFFIX_MASK.value,
          block_size=_BLOCK_SIZE.value,
          steps_per_block=int(steps),
        )
        for steps in _STEPS.value
        for cache_mode in _CACHE_MODE.value
      ]
    results = time_settings(
      decoder,
      params,
      settings,
      batch,
      prompt_len=_PROMPT_LEN.value,
      warmup=_WARMUP.value,
      repeats=_REPEATS.value,
    )
    for s, result in zip(settings, results):
      block = s.attention != "causal"
      if not block:
        ar_tokens_per_s = result["tokens_per_s"]  # the AR row leads its windows' rows
      row = {
        "mode": "block" if block else "ar",
        "batch": batch,
        "attention": s.attention,
        "cache_mode": s.cache_mode if block else None,
        "suffix_mask": s.suffix_mask if block else None,
        "block_size": s.block_size if block else None,
        "steps_per_block": s.steps_per_block if block else None,
        "cache_windows": s.cache_windows,
        **result,
        "speedup_vs_ar": result["tokens_per_s"] / ar_tokens_per_s,
        **common,
      }
      if bandwidth:
        row["weight_bytes_per_s"] = weight_bytes * result["nfe"] / result["median_s"]
        row["roofline_fraction"] = row["weight_bytes_per_s"] / bandwidth
      rows.append(row)
      print(markdown_row(row), flush=True)
  print(
    f"\n{device.device_kind}, {cfg.num_params() / 1e6:.2f}M parameters, {cfg.dtype}, "
    f"prompt {_PROMPT_LEN.value} + {_GEN_LEN.value} generated tokens per row"
  )
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(rows, f, indent=1)


def run():
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
