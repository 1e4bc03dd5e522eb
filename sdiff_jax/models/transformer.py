"""Dense transformer denoiser: RoPE, RMSNorm, SwiGLU, grouped-query attention.

One module serves every attention mode: the caller passes the boolean
attention mask (see `attention_masks`). Decoding passes an explicit KV cache
pytree: the new keys/values are written at `cache_index` and the queries
attend over the whole cache, so the mask is then `[B, T, S_cache]`.

Parameters carry logical axis names (`vocab`, `embed`, `heads`, `kv_heads`,
`head_dim`, `mlp`); `sharding.py` maps them to mesh axes.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

KVCache = list[dict[str, jax.Array]]  # per layer: k, v of shape [B, S, KVH, Dh]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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
  attention_impl: str | None = None  # None / "xla" / "cudnn"

  @property
  def compute_dtype(self) -> Any:
    return _DTYPES[self.dtype]

  def num_params(self) -> int:
    """Parameter count (embedding included)."""
    d, h, kv, dh, f = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.d_ff
    per_layer = d * dh * (h + 2 * kv) + h * dh * d + 3 * d * f + 2 * d
    unembed = 0 if self.tie_embeddings else d * self.vocab_size
    return self.vocab_size * d + unembed + self.n_layers * per_layer + d


def _dense_init(axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes)


class RMSNorm(nn.Module):
  eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    scale_D = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        (x_BxTxD.shape[-1],))
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
  out = jnp.concatenate([x1 * cos_BxTx1xF - x2 * sin_BxTx1xF,
                         x2 * cos_BxTx1xF + x1 * sin_BxTx1xF], axis=-1)
  return out.astype(x_BxTxHxDh.dtype)


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, cache=None, cache_index=None):
    cfg, dtype = self.cfg, self.cfg.compute_dtype

    def proj(heads, name, axes):
      return nn.DenseGeneral((heads, cfg.head_dim), use_bias=False, dtype=dtype,
                             kernel_init=_dense_init(axes), name=name)(x_BxTxD)

    q_BxTxHxDh = proj(cfg.n_heads, "query", ("embed", "heads", "head_dim"))
    k_BxTxKxDh = proj(cfg.n_kv_heads, "key", ("embed", "kv_heads", "head_dim"))
    v_BxTxKxDh = proj(cfg.n_kv_heads, "value", ("embed", "kv_heads", "head_dim"))
    q_BxTxHxDh = apply_rope(q_BxTxHxDh, positions_BxT, cfg.rope_theta)
    k_BxTxKxDh = apply_rope(k_BxTxKxDh, positions_BxT, cfg.rope_theta)
    if cache is not None:
      start = (0, cache_index, 0, 0)
      k_BxSxKxDh = jax.lax.dynamic_update_slice(cache["k"], k_BxTxKxDh.astype(cache["k"].dtype), start)
      v_BxSxKxDh = jax.lax.dynamic_update_slice(cache["v"], v_BxTxKxDh.astype(cache["v"].dtype), start)
      cache = {"k": k_BxSxKxDh, "v": v_BxSxKxDh}
    else:
      k_BxSxKxDh, v_BxSxKxDh = k_BxTxKxDh, v_BxTxKxDh
    out_BxTxHxDh = jax.nn.dot_product_attention(
        q_BxTxHxDh, k_BxSxKxDh.astype(dtype), v_BxSxKxDh.astype(dtype),
        mask=mask_BxTxS[:, None], implementation=cfg.attention_impl)
    out_BxTxD = nn.DenseGeneral(
        cfg.d_model, axis=(-2, -1), use_bias=False, dtype=dtype,
        kernel_init=_dense_init(("heads", "head_dim", "embed")), name="out")(out_BxTxHxDh)
    return out_BxTxD, cache


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg, dtype = self.cfg, self.cfg.compute_dtype
    dense = lambda feat, axes, name: nn.Dense(
        feat, use_bias=False, dtype=dtype, kernel_init=_dense_init(axes), name=name)
    gate_BxTxF = dense(cfg.d_ff, ("embed", "mlp"), "gate")(x_BxTxD)
    up_BxTxF = dense(cfg.d_ff, ("embed", "mlp"), "up")(x_BxTxD)
    return dense(cfg.d_model, ("mlp", "embed"), "down")(nn.silu(gate_BxTxF) * up_BxTxF)


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, cache=None, cache_index=None):
    cfg = self.cfg
    h, cache = Attention(cfg, name="attn")(
        RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="attn_norm")(x_BxTxD),
        positions_BxT, mask_BxTxS, cache, cache_index)
    x_BxTxD = x_BxTxD + h
    x_BxTxD = x_BxTxD + MLP(cfg, name="mlp")(
        RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="mlp_norm")(x_BxTxD))
    return x_BxTxD, cache


class Transformer(nn.Module):
  """Token ids -> logits over the vocabulary (MASK included; callers suppress it)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array, mask_BxTxS: jax.Array,
               cache: KVCache | None = None, cache_index: jax.Array | None = None
               ) -> tuple[jax.Array, KVCache | None]:
    cfg = self.cfg
    embed = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(stddev=1.0), ("vocab", "embed")), name="embed")
    x_BxTxD = embed(tokens_BxT)
    block_cls = nn.remat(Block, prevent_cse=True) if cfg.remat and cache is None else Block
    new_cache = None if cache is None else []
    for i in range(cfg.n_layers):
      layer_cache = None if cache is None else cache[i]
      x_BxTxD, layer_cache = block_cls(cfg, name=f"layer_{i}")(
          x_BxTxD, positions_BxT, mask_BxTxS, layer_cache, cache_index)
      if cache is not None:
        new_cache.append(layer_cache)
    x_BxTxD = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="final_norm")(x_BxTxD)
    if cfg.tie_embeddings:  # logits start with std ~1
      logits_BxTxV = embed.attend(x_BxTxD) / jnp.sqrt(cfg.d_model).astype(x_BxTxD.dtype)
    else:  # logits start with std ~ d_model**-0.5: near-uniform predictions
      unembed_init = nn.with_logical_partitioning(
          nn.initializers.normal(stddev=1.0 / cfg.d_model), ("embed", "vocab"))
      logits_BxTxV = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                              kernel_init=unembed_init, name="unembed")(x_BxTxD)
    return logits_BxTxV.astype(jnp.float32), new_cache


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype: Any = None) -> KVCache:
  """An empty KV cache for `length` positions."""
  shape = (batch, length, cfg.n_kv_heads, cfg.head_dim)
  dtype = dtype or cfg.compute_dtype
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layers)]
