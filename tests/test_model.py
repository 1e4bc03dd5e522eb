"""Denoiser: shapes, dtypes, what each attention mode may see, KV cache exactness."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdiff_jax.models import ModelConfig, Transformer, init_cache, training_mask
from sdiff_jax.models.attention_masks import block_causal_mask, causal_mask

CFG = ModelConfig(
  vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64
)
L = 16
BLOCK = 4
APPLY = jax.jit(Transformer(CFG).apply)  # one compilation per input shape for the module


def _inputs(key, batch=2, length=L):
  tokens = jax.random.randint(key, (batch, length), 4, CFG.vocab_size)
  # row 0: two documents (10 + 6 tokens); row 1: one document of 13 then padding
  seg = np.zeros((batch, length), np.int32)
  seg[0, :10], seg[0, 10:] = 1, 2
  seg[1, :13] = 1
  pos = np.zeros_like(seg)
  pos[0, :10], pos[0, 10:] = np.arange(10), np.arange(6)
  pos[1, :13] = np.arange(13)
  return tokens, jnp.asarray(seg), jnp.asarray(pos)


@pytest.fixture(scope="module")
def params():
  tokens, seg, pos = _inputs(jax.random.key(0))
  return Transformer(CFG).init(
    jax.random.key(1), tokens, pos, training_mask("bidirectional", seg, BLOCK)
  )["params"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shapes_and_dtypes(dtype):
  cfg = ModelConfig(**{**CFG.__dict__, "dtype": dtype, "tie_embeddings": dtype == "bfloat16"})
  tokens, seg, pos = _inputs(jax.random.key(0))
  model = Transformer(cfg)
  variables = model.init(jax.random.key(1), tokens, pos, training_mask("bidirectional", seg, BLOCK))
  logits, cache = model.apply(variables, tokens, pos, training_mask("bidirectional", seg, BLOCK))
  assert logits.shape == (2, L, CFG.vocab_size) and logits.dtype == jnp.float32
  assert cache is None
  leaves = jax.tree.leaves(variables)
  assert all(x.dtype == jnp.float32 for x in leaves)  # parameters stay float32
  assert sum(x.size for x in leaves) == cfg.num_params()


def _influence(params, mode, query, perturb_at):
  """Does changing the token at `perturb_at` change the logits at `query` (row 0)?"""
  tokens, seg, pos = _inputs(jax.random.key(0))
  apply = APPLY
  if mode == "block_causal":
    run = lambda t: apply(
      {"params": params}, t, jnp.concatenate([pos, pos], 1), block_causal_mask(seg, BLOCK)
    )[0]
    tokens = jnp.concatenate([tokens, tokens], axis=1)  # [x_t ; x_0]
  else:
    run = lambda t: apply({"params": params}, t, pos, training_mask(mode, seg, BLOCK))[0]
  changed = tokens.at[0, perturb_at].set((tokens[0, perturb_at] + 1 - 4) % (CFG.vocab_size - 4) + 4)
  return not np.allclose(run(tokens)[0, query], run(changed)[0, query], atol=1e-6)


def test_bidirectional_sees_own_document_only(params):
  assert _influence(params, "bidirectional", query=2, perturb_at=9)  # later token, same doc
  assert not _influence(params, "bidirectional", query=2, perturb_at=11)  # other document
  assert not _influence(params, "bidirectional", query=12, perturb_at=3)


def test_causal_sees_only_the_past(params):
  assert _influence(params, "causal", query=5, perturb_at=2)
  assert _influence(params, "causal", query=5, perturb_at=5)
  assert not _influence(params, "causal", query=5, perturb_at=6)
  assert not _influence(params, "causal", query=11, perturb_at=9)  # previous document


def test_block_causal_visibility(params):
  # noisy positions 0..L-1, clean copy at L..2L-1; blocks of 4. Query: noisy token 5 (block 1).
  assert _influence(params, "block_causal", query=5, perturb_at=7)  # own noisy block
  assert not _influence(params, "block_causal", query=5, perturb_at=8)  # later noisy block
  assert not _influence(params, "block_causal", query=5, perturb_at=1)  # earlier noisy block
  assert _influence(params, "block_causal", query=5, perturb_at=L + 3)  # clean earlier block
  assert not _influence(params, "block_causal", query=5, perturb_at=L + 4)  # clean own block
  assert not _influence(params, "block_causal", query=5, perturb_at=L + 9)
  # the clean copy is token-causal and never sees the noisy copy
  assert _influence(params, "block_causal", query=L + 6, perturb_at=L + 5)
  assert not _influence(params, "block_causal", query=L + 6, perturb_at=L + 7)
  assert not _influence(params, "block_causal", query=L + 6, perturb_at=6)


def test_kv_cache_matches_full_forward(params):
  """Prefill + chunked cached forwards == one causal forward, on random tokens."""
  apply = APPLY
  tokens = jax.random.randint(jax.random.key(3), (2, L), 4, CFG.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(L), (2, L))
  seg = jnp.ones((2, L), jnp.int32)
  full, _ = apply({"params": params}, tokens, pos, causal_mask(seg))
  cache = init_cache(CFG, 2, L)
  idx = jnp.arange(L)
  outs = []
  for start, size in ((0, 6), (6, 1), (7, 5), (12, 4)):
    q_idx = idx[start : start + size]
    mask = jnp.broadcast_to(q_idx[:, None] >= idx[None, :], (2, size, L))
    out, cache = apply(
      {"params": params},
      tokens[:, start : start + size],
      pos[:, start : start + size],
      mask,
      cache,
      start,
    )
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_gqa_equals_repeated_heads():
  """GQA with kv heads repeated into a full MHA model gives the same logits."""
  tokens, seg, pos = _inputs(jax.random.key(0))
  mask = training_mask("bidirectional", seg, BLOCK)
  gqa = Transformer(CFG)
  p = gqa.init(jax.random.key(4), tokens, pos, mask)["params"]
  mha_cfg = ModelConfig(**{**CFG.__dict__, "n_kv_heads": CFG.n_heads})
  groups = CFG.n_heads // CFG.n_kv_heads
  p_mha = jax.tree_util.tree_map_with_path(
    lambda path, x: (
      jnp.repeat(x, groups, axis=2)  # [layers, embed, kv_heads, head_dim]
      if any(getattr(k, "key", None) in ("key", "value") for k in path)
      else x
    ),
    p,
  )
  a = gqa.apply({"params": p}, tokens, pos, mask)[0]
  b = Transformer(mha_cfg).apply({"params": p_mha}, tokens, pos, mask)[0]
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_chunked_attention_equals_xla_with_gradients():
  """Query-chunked attention (GQA, segment + block-causal masks) equals XLA's whole-matrix
  attention, in value and in the gradients of q, k and v, on fresh random inputs."""
  from sdiff_jax.models.transformer import attention

  kq, kk, kv, kg = jax.random.split(jax.random.key(7), 4)
  b, t, h, k, dh = 2, 64, 4, 2, 8
  q = jax.random.normal(kq, (b, t, h, dh))
  keys, values = jax.random.normal(kk, (b, t, k, dh)), jax.random.normal(kv, (b, t, k, dh))
  seg = np.ones((b, t), np.int32)
  seg[0, 40:] = 2
  blocks = np.arange(t) // 8  # block-causal within segments
  mask = (seg[:, :, None] == seg[:, None, :]) & (blocks[:, None] >= blocks[None, :])
  cotangent = jax.random.normal(kg, (b, t, h, dh))

  def loss(impl, q, keys, values):
    return jnp.sum(attention(q, keys, values, jnp.asarray(mask), impl, chunk=16) * cotangent)

  grads = {
    impl: jax.jit(jax.grad(lambda *a, impl=impl: loss(impl, *a), argnums=(0, 1, 2)))(
      q, keys, values
    )
    for impl in (None, "chunked")
  }
  for full, chunked in zip(grads[None], grads["chunked"]):  # d/dq, d/dk, d/dv
    np.testing.assert_allclose(chunked, full, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(
    attention(q, keys, values, jnp.asarray(mask), "chunked", 16),
    attention(q, keys, values, jnp.asarray(mask), None),
    atol=1e-6,
  )


def test_unrolled_layers_equal_the_scan(params):
  """The decoder's unrolled model on `unstack_layers` parameters gives the scanned model's
  logits, without and with a KV cache (prefill, then one token)."""
  import dataclasses

  from sdiff_jax.models import unstack_layers

  unrolled_cfg = dataclasses.replace(CFG, scan_layers=False)
  unrolled = unstack_layers(params, CFG.n_layers)
  assert "layers" not in unrolled and "layer_1" in unrolled
  tokens, seg, pos = _inputs(jax.random.key(3))
  mask = training_mask("bidirectional", seg, BLOCK)
  apply_unrolled = jax.jit(Transformer(unrolled_cfg).apply)
  np.testing.assert_allclose(
    apply_unrolled({"params": unrolled}, tokens, pos, mask)[0],
    APPLY({"params": params}, tokens, pos, mask)[0],
    atol=1e-5,
    rtol=1e-5,
  )
  causal = jnp.broadcast_to(jnp.tril(jnp.ones((L, L), bool)), (2, L, L))
  outs = []
  for cfg, p, apply in ((CFG, params, APPLY), (unrolled_cfg, unrolled, apply_unrolled)):
    cache = init_cache(cfg, 2, L)
    _, cache = apply(
      {"params": p}, tokens[:, : L - 1], pos[:, : L - 1], causal[:, : L - 1], cache, 0
    )
    outs.append(
      apply({"params": p}, tokens[:, L - 1 :], pos[:, L - 1 :], causal[:, L - 1 :], cache, L - 1)[0]
    )
  np.testing.assert_allclose(outs[1], outs[0], atol=1e-5, rtol=1e-5)


def test_read_next_reads_position_t_plus_1_only_when_asked_and_outputs_slice():
  cfg = ModelConfig(**{**CFG.__dict__, "read_next": True})
  model = Transformer(cfg)
  tokens, seg, pos = _inputs(jax.random.key(3))
  mask = training_mask("causal", seg, BLOCK)
  params = nn.meta.unbox(model.init(jax.random.key(1), tokens, pos, mask)["params"])
  base = Transformer(CFG).apply({"params": params}, tokens, pos, mask)[0]
  # zero at init: the same outputs as the model without the term
  np.testing.assert_allclose(model.apply({"params": params}, tokens, pos, mask)[0], base, atol=1e-6)
  kernel = jax.random.normal(jax.random.key(2), params["read_next"]["kernel"].shape)
  params = {**params, "read_next": {"kernel": kernel}}
  changed = tokens.at[:, 5].set((tokens[:, 5] + 1 - 4) % (CFG.vocab_size - 4) + 4)
  for read_next, differs in ((False, False), (True, True)):
    run = lambda t: model.apply({"params": params}, t, pos, mask, read_next=read_next)[0]  # noqa: E731
    out, out_changed = run(tokens), run(changed)
    # causal mask: outputs before the change see it only through the read_next term at t = 4
    np.testing.assert_allclose(out[:, :4], out_changed[:, :4], atol=1e-5)
    assert bool(jnp.any(jnp.abs(out[:, 4] - out_changed[:, 4]) > 1e-3)) == differs
  # `outputs` computes the logits of a range of positions only: the same numbers
  full = model.apply({"params": params}, tokens, pos, mask)[0]
  part = model.apply({"params": params}, tokens, pos, mask, outputs=(3, 9))[0]
  np.testing.assert_allclose(part, full[:, 3:9], atol=1e-6)
  assert model.apply({"params": params}, tokens, pos, mask, outputs=(0, 0))[0].shape[1] == 0
