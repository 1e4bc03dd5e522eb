"""Trajectory pools (`sdiff_jax.trajectories`): replay, the score against a direct
computation, selection, and the CLI end to end (resumable) on a tiny model."""

import math
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import run_module, shifted_objective, tiny_config
from sdiff_jax import train, trajectories
from sdiff_jax.data import tokenizer as tokenizer_lib

M = tokenizer_lib.MASK_ID


def test_states_replay_every_step():
  got = list(trajectories.states([10, 11, 12, 13, 14, 15], [1, 0, 1, 2, 0, 0], block_size=4))
  assert [(j, s) for j, s, _, _ in got] == [(0, 0), (0, 1), (0, 2), (1, 0)]
  assert [list(state) for _, _, state, _ in got] == [
    [M, M, M, M],
    [M, 11, M, M],
    [10, 11, 12, M],
    [10, 11, 12, 13, M, M],
  ]
  assert [list(np.flatnonzero(c)) for _, _, _, c in got] == [[1], [0, 2], [3], [4, 5]]
  with pytest.raises(ValueError, match="every token committed"):
    list(trajectories.states([10, 11], [0, -1], block_size=4))


def random_pool(rng, shapes, block_size=4):
  """Trajectories of random tokens, one per (prompt_len, gen_len), each block's tokens
  committed two per step in a random order."""
  pool = []
  for n, (prompt_len, gen_len) in enumerate(shapes):
    blocks = math.ceil(gen_len / block_size)
    commit = np.concatenate([rng.permutation(block_size) // 2 for _ in range(blocks)])
    pool.append(
      trajectories.Trajectory(
        prompt_id=n,
        prompt=[tokenizer_lib.BOS_ID] + rng.integers(4, 64, prompt_len - 1).tolist(),
        tokens=rng.integers(tokenizer_lib.NUM_SPECIAL, 64, gen_len).tolist(),
        commit_step=commit[:gen_len].tolist(),
        block_size=block_size,
        settings={},
      )
    )
  return pool


def test_score_matches_a_direct_computation(code_corpus_dir):
  objective, params = shifted_objective(code_corpus_dir, block_size=4)
  pool = random_pool(np.random.default_rng(0), [(5, 7), (9, 4), (3, 8)])
  got = trajectories.score(objective, params, pool, chunk=3)

  for t, bits in zip(pool, got):
    total = 0.0
    for _, _, state, committed in trajectories.states(t.tokens, t.commit_step, 4):
      row = jnp.asarray([t.prompt + state.tolist()], jnp.int32)
      batch = {
        "tokens": row,
        "segment_ids": jnp.ones_like(row),
        "positions": jnp.arange(row.shape[1])[None],
      }
      logits = objective.logits(params, row, batch)[0, len(t.prompt) :]
      logp = jax.nn.log_softmax(logits.at[:, M].set(-jnp.inf))
      targets = np.asarray(t.tokens[: state.size])
      total -= float(logp[np.flatnonzero(committed), targets[committed]].sum())
    assert bits == pytest.approx(total / math.log(2) / len(t.tokens), rel=1e-4)


def test_score_compiles_once_per_length_bucket(code_corpus_dir):
  """Pools of other lengths and sizes within one bucket reuse the scorer's compilation."""
  objective, params = shifted_objective(code_corpus_dir, block_size=4)
  rng = np.random.default_rng(1)
  trajectories.score(objective, params, random_pool(rng, [(5, 7), (9, 4)]), chunk=4)
  compiled = trajectories._committed_bits._cache_size()
  for shapes in ([(3, 8), (20, 12), (7, 5)], [(30, 30)], [(2, 1)] * 5):
    trajectories.score(objective, params, random_pool(rng, shapes), chunk=4)
  assert trajectories._committed_bits._cache_size() == compiled


def test_select_keeps_the_highest_bound_per_prompt():
  def t(prompt_id, bits, steps):
    return trajectories.Trajectory(
      prompt_id, [1], [5], [0], 4, {"steps_per_block": steps}, score_bits=bits
    )

  pool = [t(0, 3.0, 4), t(0, 1.0, 8), t(0, 2.0, 4), t(1, 5.0, 8), t(1, 4.0, 4)]
  kept, report = trajectories.select(pool, keep=1)
  assert [(k.prompt_id, k.score_bits) for k in kept] == [(0, 1.0), (1, 4.0)]
  assert report["prompts"] == 2 and report["kept"]["count"] == 2
  assert report["dropped"]["count"] == 3 and report["dropped"]["mean"] == pytest.approx(10 / 3)
  assert report["kept_steps_per_block"] == {"8": 1, "4": 1}
  two, _ = trajectories.select(pool, keep=2)
  assert sorted(k.score_bits for k in two) == [1.0, 2.0, 4.0, 5.0]
  with pytest.raises(ValueError, match="keep at least one"):
    trajectories.select(pool, keep=0)


def _cli(*args: str) -> subprocess.CompletedProcess:
  return run_module("sdiff_jax.trajectories", *args, timeout=600)


def test_cli_builds_scores_selects_and_resumes(tmp_path, code_corpus_dir):
  config = tiny_config(code_corpus_dir, num_steps=2, checkpoint_every=2, eval_every=2)
  config.curriculum.edit_start_fraction = 1.0
  workdir = str(tmp_path / "model")
  train.train_and_evaluate(config, workdir)
  out = tmp_path / "pool"
  args = [
    f"--workdir={workdir}",
    f"--out={out}",
    "--num_prompts=3",
    "--chunk_prompts=2",
    "--prompt_len=8",
    "--max_new_tokens=16",
    "--steps_per_block=2,4",
    "--samples=2",
  ]
  first = _cli(*args)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "chunk 2/2" in first.stderr
  chunks = sorted(p for p in os.listdir(out) if p.startswith("pool."))
  assert chunks == ["pool.p000.c00000.array_record", "pool.p000.c00001.array_record"]
  pool = trajectories.read([str(out / c) for c in chunks])
  assert len(pool) == 3 * 2 * 2  # prompts x steps_per_block values x samples
  for t in pool:
    assert len(t.prompt) == 9 and 0 < len(t.tokens) <= 16 and np.isfinite(t.score_bits)
    assert max(t.commit_step) < t.settings["steps_per_block"]
  selected = trajectories.read([str(out / trajectories.SELECTED)])
  assert len(selected) == 3
  for s in selected:
    assert s.score_bits == min(t.score_bits for t in pool if t.prompt_id == s.prompt_id)

  # an interrupted run: the missing chunk is rebuilt, the others are kept as they are
  os.remove(out / chunks[1])
  kept = os.stat(out / chunks[0]).st_mtime_ns
  again = _cli(*args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "chunk 2/2" in again.stderr and "chunk 1/2" not in again.stderr
  assert os.stat(out / chunks[0]).st_mtime_ns == kept

  # the distillation stage: from the pre-trained workdir, on the selected trajectories
  distill = tiny_config(
    code_corpus_dir, num_steps=2, checkpoint_every=2, eval_every=2, init_from=workdir
  )
  distill.distill.pool = str(out)
  result = train.train_and_evaluate(distill, str(tmp_path / "distilled"))
  assert np.isfinite(result.metrics["eval_mask_bits"])  # watched on the held-out ELBO
  distill.train.num_steps = 3  # resumes both streams (real rows and pairs) from step 2
  assert int(train.train_and_evaluate(distill, str(tmp_path / "distilled")).state.step) == 3
  missing = tiny_config(code_corpus_dir, num_steps=1, init_from=workdir)
  missing.distill.pool = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="python -m sdiff_jax.trajectories"):
    train.train_and_evaluate(missing, str(tmp_path / "nothing"))

  causal = tiny_config(code_corpus_dir, attention="causal", num_steps=1, checkpoint_every=1)
  train.train_and_evaluate(causal, str(tmp_path / "ar"))
  refused = _cli(f"--workdir={tmp_path / 'ar'}", f"--out={tmp_path / 'x'}")
  assert refused.returncode == 2 and "trajectories need a diffusion model" in refused.stderr


def test_distill_pairs_and_loss(code_corpus_dir, tmp_path):
  """(state, final) rows agree wherever the state is committed; batches replay from the
  iterator state; with f = identity the loss is the per-row mean NLL of the MASK inputs
  (lambda = 1 / masked count) plus the weighted visible term, computed by hand."""
  objective, params = shifted_objective(code_corpus_dir, block_size=4)
  rng = np.random.default_rng(1)
  pool = [
    trajectories.Trajectory(
      n,
      [tokenizer_lib.BOS_ID, 9, 10],
      rng.integers(4, 64, 8).tolist(),
      (rng.permutation(8) % 4).tolist(),
      4,
      {"steps_per_block": 4},
      score_bits=1.0,
    )
    for n in range(3)
  ]
  path = str(tmp_path / trajectories.SELECTED)
  trajectories._write(path, pool)
  pairs = trajectories.DistillPairs([path], batch_size=4, seed=0, max_len=64)
  first = next(pairs)
  assert first["tokens"].shape == (4, 11)
  real = first["segment_ids"] > 0
  committed = real & (first["state"] != M)
  np.testing.assert_array_equal(first["state"][committed], first["tokens"][committed])
  assert np.any(real & (first["state"] == M))
  pairs.set_state({"batch": 0})
  np.testing.assert_array_equal(next(pairs)["state"], first["state"])
  with pytest.raises(ValueError, match="exceed the model's context"):
    trajectories.DistillPairs([path], batch_size=4, seed=0, max_len=8)

  objective.config.distill.edit_alpha = 0.0
  objective.config.distill.anchor_weight = 0.0
  clean = {k: jnp.asarray(first[k]) for k in ("tokens", "segment_ids", "positions")}
  batch = {**clean, **{f"pair_{k}": jnp.asarray(v) for k, v in first.items()}}
  loss, metrics = objective(params, batch, jax.random.key(0), "distill")
  logits = objective.logits(params, batch["pair_state"], clean).at[..., M].set(-jnp.inf)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), clean["tokens"][..., None], -1)[..., 0]
  nll = np.asarray(nll) / math.log(2)
  scored = real & (first["positions"] > 0)
  masked = scored & (first["state"] == M)
  rows = [nll[r][masked[r]].mean() for r in range(4) if masked[r].any()]
  assert float(metrics["distill_masked_bits"]) == pytest.approx(np.mean(rows), rel=1e-4)
  visible = nll[scored & ~masked].mean()
  assert float(metrics["distill_visible_bits"]) == pytest.approx(visible, rel=1e-4)
  assert float(loss) == pytest.approx(np.mean(rows) + 0.25 * visible, rel=1e-4)
  # the anchor: the pre-training loss of the real rows, with its own key, added
  objective.config.distill.anchor_weight = 2.0
  anchored, metrics = objective(params, batch, jax.random.key(0), "distill")
  anchor, _ = objective(params, clean, jax.random.split(jax.random.key(0))[1], "mask+edit")
  assert float(metrics["anchor_loss"]) == pytest.approx(float(anchor), rel=1e-5)
  assert float(anchored) == pytest.approx(float(loss) + 2.0 * float(anchor), rel=1e-5)
