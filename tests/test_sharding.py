"""Meshes, parameter shardings, sharded == single-device steps, resharded restore."""

import functools

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from helpers import tiny_config
from sdiff_jax import checkpointing, sharding, train

VOCAB = 64


def _config(mesh_shape, attention="bidirectional"):
  c = tiny_config("unused", attention=attention)
  c.model.d_model, c.model.n_heads, c.model.n_kv_heads, c.model.d_ff = 32, 4, 2, 64
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_shape
  return c


def _batch(batch=8, length=64, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, VOCAB, (batch, length)).astype(np.int32)
  seg = np.ones((batch, length), np.int32)
  seg[:, length // 2 :] = 2
  seg[::3, -5:] = 0  # some padding
  pos = np.where(seg == 1, np.arange(length), np.arange(length) - length // 2)
  tokens[seg == 0] = 0
  return {
    "tokens": tokens,
    "segment_ids": seg,
    "positions": np.where(seg == 0, 0, pos).astype(np.int32),
  }


@functools.lru_cache(maxsize=None)
def _run(mesh_shape, attention, steps=1):
  """`steps` train steps, the last with the edit term; cached per (mesh, mode)."""
  config = _config(mesh_shape, attention)
  devices = jax.devices()[: int(np.prod(mesh_shape))]
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  setup = train.TrainSetup.create(config, VOCAB, mesh)
  state = setup.init_state(jax.random.key(0))
  step = train.make_train_step(setup)
  losses = []
  for i in range(steps):
    state, metrics = step(
      state,
      sharding.global_batch(_batch(seed=i), mesh),
      jax.random.key(1),
      stage="mask+edit" if i == steps - 1 else "mask",
    )
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params), state, mesh


@pytest.mark.parametrize(
  "mesh_shape,attention",
  [
    ((8, 1, 1), "bidirectional"),
    ((2, 4, 1), "bidirectional"),
    ((2, 2, 2), "bidirectional"),
    ((2, 2, 2), "block_causal"),
    ((2, 2, 2), "causal"),
  ],
)
def test_sharded_step_equals_single_device(mesh_shape, attention):
  ref_losses, ref_params, _, _ = _run((1, 1, 1), attention)
  losses, params, state, mesh = _run(mesh_shape, attention)
  # Reductions run in a different order across devices: float32 tolerance.
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert dict(mesh.shape) == dict(zip(sharding.MESH_AXES, mesh_shape))


def test_parameter_shardings_follow_the_rules():
  _, _, state, _ = _run((2, 2, 2), "bidirectional")
  p = state.params
  assert p["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
  layers = p["layers"]  # the scanned layer: a leading, unsharded `layers` axis
  assert layers["attn"]["query"].sharding.spec == P(None, "fsdp", "tensor", None)
  assert layers["attn"]["out"].sharding.spec == P(None, "tensor", None, "fsdp")
  assert layers["mlp"]["down"]["kernel"].sharding.spec == P(None, "tensor", "fsdp")
  assert layers["attn_norm"]["scale"].sharding.spec == P(None, "fsdp")
  # Adam moments are sharded like their parameters.
  mu = state.opt_state[1][0].mu
  assert mu["layers"]["mlp"]["up"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")


def test_mesh_sizes():
  c = _config((-1, 2, 1))
  assert dict(sharding.make_mesh(c.mesh).shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  c.mesh.data = 3
  with pytest.raises(ValueError, match="need 6 devices, have 8"):
    sharding.make_mesh(c.mesh)


@pytest.mark.parametrize("restore_devices", [4, 1])
def test_checkpoint_saved_on_8_devices_restores_on_fewer(tmp_path, restore_devices):
  _, params8, state8, _ = _run((2, 4, 1), "bidirectional")
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  checkpointing.save(mngr, state8, {"pos": 3})
  mngr.wait_until_finished()

  config = _config((1, restore_devices, 1))
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:restore_devices])
  setup = train.TrainSetup.create(config, VOCAB, mesh)
  state, data = checkpointing.restore(mngr, 1, setup.abstract_state)
  assert data == {"pos": 3}
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params8)):
    np.testing.assert_array_equal(np.asarray(a), b)
  leaf = state.params["layers"]["mlp"]["up"]["kernel"]
  assert len(leaf.sharding.device_set) == restore_devices
