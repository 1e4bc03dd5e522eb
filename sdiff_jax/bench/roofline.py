"""Roofline arithmetic for `python -m sdiff_jax.bench.accelerator`, flag-free.

What a measured speed is compared with: the model FLOPs of a train step per token and a
device's peak bf16 FLOP/s (MFU), the bytes a decoding forward must read and a measured
device copy bandwidth (the memory roofline), and XLA's memory analysis of a compiled
step. Kept apart from the CLI so that tests recompute the same numbers.
"""

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp

from sdiff_jax.models import ModelConfig

# Dense bf16 tensor-core peaks (vendor datasheets, without sparsity), matched in this
# order as substrings of jax's `device_kind` ("H100 PCIe" before "H100", "H200" before "H20").
PEAK_BF16_FLOPS = (
  ("H100 PCIe", 756e12),
  ("H100 NVL", 835e12),
  ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
  ("H200 NVL", 835e12),
  ("H200", 989e12),
  ("H20", 148e12),
  ("A100", 312e12),
  ("L40S", 362e12),
  ("TPU v4", 275e12),
  ("TPU v5 lite", 197e12),
  ("TPU v5", 459e12),  # v5p
  ("TPU v6 lite", 918e12),
)


def peak_flops(device_kind: str) -> float | None:
  """The device's peak bf16 FLOP/s, or None when it is not in PEAK_BF16_FLOPS."""
  for name, peak in PEAK_BF16_FLOPS:
    if name in device_kind:
      return peak
  return None


def matmul_params(cfg: ModelConfig) -> int:
  """N of 6N: the parameters a token multiplies by, i.e. all but the input embedding
  table (a gather); the unembedding (or the tied table it reuses) counts."""
  input_table = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
  return cfg.num_params() - input_table + (cfg.d_model**2 if cfg.read_next else 0)


def train_flops_per_token(
  cfg: ModelConfig, seq_len: int, forwards: int, length_factor: int = 1
) -> dict[str, Any]:
  """Model FLOPs of a train step per token of the batch, with the formula.

  Each forward (with its backward) costs 6N per model position plus 12 * n_layers *
  T * d_attention for the attention scores and their weighted sum over T keys (full T x T,
  as the masked kernels compute it). `forwards`: 2 in stage "mask+edit" (the masked and
  the edited input). `length_factor`: model positions per row token (2 for block_causal's
  [x_t ; x_0]). Rematerialisation's extra forward is not counted (model FLOPs, not
  hardware FLOPs).
  """
  n = matmul_params(cfg)
  d_attention = cfg.n_heads * cfg.head_dim
  model_len = length_factor * seq_len
  per_forward = 6 * n + 12 * cfg.n_layers * model_len * d_attention
  return {
    "flops_per_token": forwards * length_factor * per_forward,
    "matmul_params": n,
    "d_attention": d_attention,
    "model_seq_len": model_len,
    "forwards": forwards,
    "formula": "forwards * length_factor * (6 * N + 12 * n_layers * model_seq_len * "
    "d_attention); N = parameters but the input embedding table (the unembedding counts), "
    "d_attention = n_heads * head_dim; remat's recomputed forward not counted",
  }


def weight_bytes(params: Any, cfg: ModelConfig) -> int:
  """Bytes of the parameters a decoding forward reads in full: all of them (as stored, in
  the decoding dtype) but the untied input embedding table, of which it gathers rows."""
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  return total - (0 if cfg.tie_embeddings else params["embed"]["embedding"].nbytes)


def decode_bytes_per_forward(
  cfg: ModelConfig, weights: int, batch: int, prompt_len: int, gen_len: int
) -> dict[str, Any]:
  """Bytes one decoding forward must read: the weights plus the filled KV cache, whose
  mean over a generation (the cache grows from P to P + G slots) is P + G / 2 slots."""
  itemsize = jnp.dtype(cfg.compute_dtype).itemsize
  slots = prompt_len + gen_len / 2
  kv = cfg.n_layers * 2 * batch * slots * cfg.n_kv_heads * cfg.head_dim * itemsize
  return {
    "weight_bytes": weights,
    "kv_bytes": kv,
    "bytes_per_forward": weights + kv,
    "formula": "weight_bytes + n_layers * 2 * batch * (prompt_len + gen_len / 2) * "
    "n_kv_heads * head_dim * dtype_bytes",
  }


def copy_bandwidth(num_bytes: int, repeats: int = 10) -> float:
  """Device memory bandwidth in bytes/s: bytes read + written by `x + 1` on a float32
  array of `num_bytes`, median of `repeats` timed calls."""
  x = jnp.zeros((num_bytes // 4,), jnp.float32)
  copy = jax.jit(lambda x: x + 1.0)
  jax.block_until_ready(copy(x))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(copy(x))
    times.append(time.perf_counter() - start)
  return 2 * num_bytes / statistics.median(times)


def compiled_memory(compiled) -> dict[str, int]:
  """Bytes per device of a compiled executable, from XLA's memory analysis; `peak` as in
  bench.compiled.step_memory (arguments + outputs - donated aliases + temporaries)."""
  a = compiled.memory_analysis()
  return {
    "peak": a.argument_size_in_bytes
    + a.output_size_in_bytes
    - a.alias_size_in_bytes
    + a.temp_size_in_bytes,
    "arguments": a.argument_size_in_bytes,
    "outputs": a.output_size_in_bytes,
    "aliased": a.alias_size_in_bytes,
    "temp": a.temp_size_in_bytes,
  }
