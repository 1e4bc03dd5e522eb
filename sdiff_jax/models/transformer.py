"""Dense transformer denoiser: RoPE, RMSNorm, SwiGLU, grouped-query attention.

One module serves every attention mode: the caller passes the boolean
attention mask (see `attention_masks`). Decoding passes an explicit KV cache
pytree: the new keys/values are written at `cache_index` and the queries
attend over the cache's first S slots, S the mask's last axis (`[B, T, S]`, S <= the
cache's length: a decoder skips the slots not filled yet).

The layers are one `nn.scan` (training): every layer parameter has a leading
`layers` axis. Decoding unrolls them (`scan_layers=False`, parameters split
once by `unstack_layers`) so no forward slices weights out of the stack. Parameters carry logical axis names (`layers`, `vocab`,
`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`); `sharding.py` maps them to
mesh axes.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

# k, v of shape [n_layers, B, S, KVH, Dh] (scanned layers), or a list of per-layer
# {k, v} of shape [1, B, S, KVH, Dh] (unrolled layers, see ModelConfig.scan_layers).
KVCache = dict[str, jax.Array] | list[dict[str, jax.Array]]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# "" / "xla": XLA's attention; "cudnn": the fused kernel (NVIDIA GPUs; XLA's attention, with a
# warning, where cuDNN refuses the inputs); "chunked": queries in chunks of `attention_chunk`,
# O(T) memory on any backend.
ATTENTION_IMPLS = ("", "xla", "cudnn", "chunked")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of the denoiser."""

  vocab_size: int
  d_model: int = 256
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 4
  head_dim: int = 64
  d_ff: int = 1024
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  dtype: str = "float32"
  tie_embeddings: bool = False
  remat: bool = False
  attention_impl: str = ""  # one of ATTENTION_IMPLS
  attention_chunk: int = 512  # queries per chunk of the "chunked" attention
  scan_layers: bool = True  # False: unrolled layers, for decoding (see Transformer)
  # The output at position t also reads the final state of position t + 1 (a d x d map,
  # zero at init): with diffusion.shift, where output t predicts token t + 1, that is the
  # target position's own input, so keeping a clean token is a linear read (see objective.py)
  read_next: bool = False
  qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2)

  @property
  def compute_dtype(self) -> Any:
    return DTYPES[self.dtype]

  def num_params(self) -> int:
    """Parameter count (embedding included)."""
    d, h, kv, dh, f = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.d_ff
    per_layer = (d + self.qkv_bias) * dh * (h + 2 * kv) + h * dh * d + 3 * d * f + 2 * d
    unembed = 0 if self.tie_embeddings else d * self.vocab_size
    return self.vocab_size * d + unembed + self.n_layers * per_layer + d


def _rows_sharded(x: jax.Array) -> jax.Array:
  """Rows over the `batch` mesh axes while a step is traced under axis rules
  (`sharding.activation_rules`); a no-op otherwise."""
  return nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))


def _accumulate_in(dtype: Any) -> Any:
  """`preferred_element_type` of the model's weight matmuls (None: the inputs' dtype).

  On CPU, low-precision inputs accumulate into float32: XLA:CPU runs a bf16 x bf16 -> bf16
  dot on a slow path (0.4-0.95x float32 on an AVX512-BF16 EPYC, 768 x 3072 weight), and
  bf16 x bf16 -> f32 on the vector units' bf16 dot products (1.4-1.8x float32 from 33 rows
  on; at 1 row, bf16 is ~4x slower than float32 either way). Accelerators accumulate in
  float32 inside the kernel anyway and keep the narrow output."""
  if jnp.dtype(dtype) == jnp.float32 or jax.default_backend() != "cpu":
    return None
  return jnp.float32


def _einsum(spec: str, x: jax.Array, kernel: jax.Array, dtype: Any) -> jax.Array:
  """`x` times a weight in `dtype` (see `_accumulate_in`), the result in `dtype`."""
  out = jnp.einsum(spec, x, kernel.astype(dtype), preferred_element_type=_accumulate_in(dtype))
  return out.astype(dtype)


def _dense(features: int, dtype: Any, kernel_init, name: str) -> nn.Dense:
  """A bias-free `nn.Dense` whose matmul accumulates as `_accumulate_in` says (cast the
  result back to `dtype`)."""
  return nn.Dense(
    features,
    use_bias=False,
    dtype=dtype,
    kernel_init=kernel_init,
    dot_general=functools.partial(
      jax.lax.dot_general, preferred_element_type=_accumulate_in(dtype)
    ),
    name=name,
  )


def _dense_init(axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes)


class RMSNorm(nn.Module):
  eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    scale_D = self.param(
      "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x_BxTxD.shape[-1],)
    )
    x = x_BxTxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * scale_D).astype(self.dtype)


def apply_rope(x_BxTxHxDh: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (rotate-half convention)."""
  half = x_BxTxHxDh.shape[-1] // 2
  freq_F = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxTxF = positions_BxT[..., None].astype(jnp.float32) * freq_F
  sin_BxTx1xF = jnp.sin(angle_BxTxF)[:, :, None, :]
  cos_BxTx1xF = jnp.cos(angle_BxTxF)[:, :, None, :]
  x1, x2 = jnp.split(x_BxTxHxDh.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate(
    [x1 * cos_BxTx1xF - x2 * sin_BxTx1xF, x2 * cos_BxTx1xF + x1 * sin_BxTx1xF], axis=-1
  )
  return out.astype(x_BxTxHxDh.dtype)


_CUDNN_REFUSALS: set[str] = set()  # reasons already logged, so each one is logged once


def _cudnn_or_xla(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_Bx1xTxS):
  """cuDNN's fused attention, or XLA's where jax refuses cuDNN for these inputs while
  tracing (no cuDNN on this backend, dtype, head dim, shape): a warning, not a failed job."""
  try:
    return jax.nn.dot_product_attention(
      q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask=mask_Bx1xTxS, implementation="cudnn"
    )
  except (NotImplementedError, ValueError, RuntimeError) as e:
    reason = f"{type(e).__name__}: {e}"
    if reason not in _CUDNN_REFUSALS:
      _CUDNN_REFUSALS.add(reason)
      logging.warning("cuDNN attention refused these inputs (%s): using XLA's attention", reason)
  return jax.nn.dot_product_attention(
    q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask=mask_Bx1xTxS, implementation="xla"
  )


def attention(
  q_BxTxHxDh: jax.Array,
  k_BxSxKxDh: jax.Array,
  v_BxSxKxDh: jax.Array,
  mask_BxTxS: jax.Array,
  impl: str,
  chunk: int = 512,
) -> jax.Array:
  """Softmax attention (GQA: H a multiple of K heads) under a boolean mask.

  `impl="chunked"` runs the queries `chunk` at a time, each chunk rematerialised
  in the backward pass, so memory grows with T * chunk, not T * T: the same
  numbers as XLA's attention on any backend (TPU, CPU) without a fused kernel.
  """
  length = q_BxTxHxDh.shape[1]
  if impl == "cudnn":
    return _cudnn_or_xla(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxTxS[:, None])
  if impl != "chunked":
    return jax.nn.dot_product_attention(
      q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask=mask_BxTxS[:, None], implementation=impl or None
    )
  if length <= chunk or length % chunk:
    return jax.nn.dot_product_attention(
      q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask=mask_BxTxS[:, None]
    )
  split = lambda x: jnp.moveaxis(x.reshape(x.shape[0], length // chunk, chunk, *x.shape[2:]), 1, 0)

  @jax.checkpoint
  def one(args):
    q_BxCxHxDh, mask_BxCxS = args
    return jax.nn.dot_product_attention(
      q_BxCxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask=mask_BxCxS[:, None]
    )

  out_NxBxCxHxDh = jax.lax.map(one, (split(q_BxTxHxDh), split(mask_BxTxS)))
  return jnp.moveaxis(out_NxBxCxHxDh, 0, 1).reshape(q_BxTxHxDh.shape)


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, layer, cache=None, cache_index=None):
    cfg, dtype = self.cfg, self.cfg.compute_dtype
    x_BxTxD = x_BxTxD.astype(dtype)

    def proj(heads, name, axes):
      init = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))  # fan-in d_model
      kernel_DxHxDh = self.param(
        name, nn.with_logical_partitioning(init, axes), (cfg.d_model, heads, cfg.head_dim)
      )
      out_BxTxHxDh = _einsum("btd,dhk->bthk", x_BxTxD, kernel_DxHxDh, dtype)
      if not cfg.qkv_bias:
        return out_BxTxHxDh
      bias_HxDh = self.param(
        f"{name}_bias",
        nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
        (heads, cfg.head_dim),
      )
      return out_BxTxHxDh + bias_HxDh.astype(dtype)

    q_BxTxHxDh = proj(cfg.n_heads, "query", ("embed", "heads", "head_dim"))
    k_BxTxKxDh = proj(cfg.n_kv_heads, "key", ("embed", "kv_heads", "head_dim"))
    v_BxTxKxDh = proj(cfg.n_kv_heads, "value", ("embed", "kv_heads", "head_dim"))
    q_BxTxHxDh = apply_rope(q_BxTxHxDh, positions_BxT, cfg.rope_theta)
    k_BxTxKxDh = apply_rope(k_BxTxKxDh, positions_BxT, cfg.rope_theta)
    if cache is not None:  # the whole [layers, B, S, ...] cache: written in place at `layer`
      start = (layer, 0, cache_index, 0, 0)
      cache = {
        name: jax.lax.dynamic_update_slice(cache[name], new[None].astype(cache[name].dtype), start)
        for name, new in (("k", k_BxTxKxDh), ("v", v_BxTxKxDh))
      }
      # a mask narrower than the cache: the queries see its first slots only
      slots = mask_BxTxS.shape[-1]
      k_BxSxKxDh, v_BxSxKxDh = cache["k"][layer][:, :slots], cache["v"][layer][:, :slots]
    else:
      k_BxSxKxDh, v_BxSxKxDh = k_BxTxKxDh, v_BxTxKxDh
    out_BxTxHxDh = attention(
      q_BxTxHxDh,
      k_BxSxKxDh.astype(dtype),
      v_BxSxKxDh.astype(dtype),
      mask_BxTxS,
      cfg.attention_impl,
      cfg.attention_chunk,
    )
    out_init = nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)  # fan-in H * Dh
    kernel_HxDhxD = self.param(
      "out",
      nn.with_logical_partitioning(out_init, ("heads", "head_dim", "embed")),
      (cfg.n_heads, cfg.head_dim, cfg.d_model),
    )
    out_BxTxD = _einsum("bthk,hkd->btd", out_BxTxHxDh, kernel_HxDhxD, dtype)
    return out_BxTxD, cache


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg, dtype = self.cfg, self.cfg.compute_dtype
    dense = lambda feat, axes, name: _dense(feat, dtype, _dense_init(axes), name)
    gate_BxTxF = dense(cfg.d_ff, ("embed", "mlp"), "gate")(x_BxTxD).astype(dtype)
    up_BxTxF = dense(cfg.d_ff, ("embed", "mlp"), "up")(x_BxTxD).astype(dtype)
    return dense(cfg.d_model, ("mlp", "embed"), "down")(nn.silu(gate_BxTxF) * up_BxTxF).astype(
      dtype
    )


class Block(nn.Module):
  """One layer as a scan body: carry (activations, whole cache or None), scanned layer index."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, carry, layer, positions_BxT, mask_BxTxS, cache_index):
    cfg = self.cfg
    x_BxTxD, cache = carry
    h, cache = Attention(cfg, name="attn")(
      RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="attn_norm")(x_BxTxD),
      positions_BxT,
      mask_BxTxS,
      layer,
      cache,
      cache_index,
    )
    x_BxTxD = x_BxTxD + h
    x_BxTxD = x_BxTxD + MLP(cfg, name="mlp")(
      RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="mlp_norm")(x_BxTxD)
    )
    return (_rows_sharded(x_BxTxD), cache), None


class Transformer(nn.Module):
  """Token ids -> logits over the vocabulary (MASK included; callers suppress it)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(
    self,
    tokens_BxT: jax.Array,
    positions_BxT: jax.Array,
    mask_BxTxS: jax.Array,
    cache: KVCache | None = None,
    cache_index: jax.Array | None = None,
    read_next: bool = True,
    outputs: tuple[int, int] | np.ndarray | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Logits [B, T, V] and the updated cache. `read_next=False` leaves out the
    `cfg.read_next` term (next-token training under a causal mask, where position t + 1
    holds the target). `outputs=(lo, hi)` (static) computes the logits of positions
    [lo, hi) only, [B, hi - lo, V]: a decoder forward needs few of its tokens' logits; a
    static int array of positions, those positions' logits in its order."""
    cfg = self.cfg
    embed = nn.Embed(
      cfg.vocab_size,
      cfg.d_model,
      dtype=cfg.compute_dtype,
      embedding_init=nn.with_logical_partitioning(
        nn.initializers.normal(stddev=1.0), ("vocab", "embed")
      ),
      name="embed",
    )
    x_BxTxD = _rows_sharded(embed(tokens_BxT))
    block_cls = nn.remat(Block, prevent_cse=False) if cfg.remat and cache is None else Block
    if cfg.scan_layers:
      # One scanned layer: parameters carry a leading `layers` axis. Compile time
      # does not grow with depth, and with remat the backward pass keeps only each
      # layer's input alive, whatever the backend's scheduler does. The cache rides
      # in the carry, so a forward writes only its new slots.
      layers = nn.scan(
        block_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.n_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      (x_BxTxD, new_cache), _ = layers(cfg, name="layers")(
        (x_BxTxD, cache), jnp.arange(cfg.n_layers), positions_BxT, mask_BxTxS, cache_index
      )
    else:
      # Layers unrolled, each with its own parameters (`unstack_layers`) and its own
      # [1, B, S, ...] cache: a scanned layer's weights are sliced out of the stack
      # on every forward (on CPU a copy), which decoding, bound by weight reads, avoids.
      new_cache = None if cache is None else []
      for i in range(cfg.n_layers):
        (x_BxTxD, layer_cache), _ = block_cls(cfg, name=f"layer_{i}")(
          (x_BxTxD, None if cache is None else cache[i]), 0, positions_BxT, mask_BxTxS, cache_index
        )
        if cache is not None:
          new_cache.append(layer_cache)
    x_BxTxD = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="final_norm")(x_BxTxD)
    if cfg.read_next:
      next_BxTxD = jnp.concatenate([x_BxTxD[:, 1:], jnp.zeros_like(x_BxTxD[:, :1])], axis=1)
      mixed_BxTxD = _dense(
        cfg.d_model,
        cfg.compute_dtype,
        nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "mlp")),
        "read_next",
      )(next_BxTxD).astype(cfg.compute_dtype)
      if read_next:  # the parameter exists either way: one parameter tree
        x_BxTxD = x_BxTxD + mixed_BxTxD
    if isinstance(outputs, np.ndarray):
      x_BxTxD = jnp.take(x_BxTxD, outputs, axis=1)
    elif outputs is not None:
      x_BxTxD = x_BxTxD[:, outputs[0] : outputs[1]]
    if cfg.tie_embeddings:  # logits start with std ~1
      logits_BxTxV = embed.attend(x_BxTxD) / jnp.sqrt(cfg.d_model).astype(x_BxTxD.dtype)
    else:  # logits start with std ~ d_model**-0.5: near-uniform predictions
      unembed_init = nn.with_logical_partitioning(
        nn.initializers.normal(stddev=1.0 / cfg.d_model), ("embed", "vocab")
      )
      logits_BxTxV = _dense(cfg.vocab_size, cfg.compute_dtype, unembed_init, "unembed")(x_BxTxD)
    return _rows_sharded(logits_BxTxV.astype(jnp.float32)), new_cache


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype: Any = None) -> KVCache:
  """An empty KV cache for `length` positions: one [n_layers, B, S, KVH, Dh] stack for
  scanned layers, a list of per-layer [1, B, S, KVH, Dh] caches for unrolled ones."""
  dtype = dtype or cfg.compute_dtype
  empty = lambda layers: {
    name: jnp.zeros((layers, batch, length, cfg.n_kv_heads, cfg.head_dim), dtype)
    for name in ("k", "v")
  }
  return empty(cfg.n_layers) if cfg.scan_layers else [empty(1) for _ in range(cfg.n_layers)]


def unstack_layers(params: dict[str, Any], n_layers: int) -> dict[str, Any]:
  """Scanned parameters ({"layers": leaves [L, ...]}) -> the unrolled model's
  ({"layer_0": ..., ...}); unrolled parameters are returned as they are."""
  if "layers" not in params:
    return params
  out = {name: value for name, value in params.items() if name != "layers"}
  for i in range(n_layers):
    out[f"layer_{i}"] = jax.tree.map(lambda p, i=i: p[i], params["layers"])
  return out
