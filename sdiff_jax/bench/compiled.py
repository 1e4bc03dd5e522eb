"""Per-device memory of a config's compiled train step, from XLA's memory analysis.

The library behind `python -m sdiff_jax.bench.memory` and tests/test_large_configs.py.
The step is lowered for abstract inputs on the current devices (nothing is allocated).
cuDNN's fused attention does not compile for CPU devices; a GPU config is measured with
the query-chunked attention instead (`attention_impl="chunked"`, 512 queries per chunk),
which like cuDNN's keeps memory linear in the sequence length (cuDNN holds less: no score
chunk at all).
"""

import time

import jax
import jax.numpy as jnp

from sdiff_jax import sharding, train

GIB = 2**30


def step_memory(config) -> dict[str, float]:
  """Bytes per device of one compiled train step (with the edit term) of `config`."""
  config = config.copy_and_resolve_references()
  if config.model.attention_impl == "cudnn":  # cuDNN does not compile for CPU devices:
    config.model.attention_impl = "chunked"  # the chunked attention stands in (both O(T) memory)
  mesh = sharding.make_mesh(config.mesh)
  setup = train.TrainSetup.create(config, config.data.vocab_size, mesh)
  batch_sh = sharding.batch_sharding(mesh)
  shape = (config.train.batch_size, config.data.seq_len)
  batch = {
    k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh)
    for k in ("tokens", "segment_ids", "positions")
  }
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
  step = train.make_train_step(setup)
  start = time.perf_counter()
  analysis = (
    step.lower(setup.abstract_state, batch, key, stage="mask+edit").compile().memory_analysis()
  )
  peak = (
    analysis.argument_size_in_bytes
    + analysis.output_size_in_bytes
    - analysis.alias_size_in_bytes
    + analysis.temp_size_in_bytes
  )
  return {
    "peak": peak,
    "arguments": analysis.argument_size_in_bytes,
    "temp": analysis.temp_size_in_bytes,
    "compile_s": time.perf_counter() - start,
    "params": setup.objective.model_cfg.num_params(),
  }


def per_device_memory(config) -> dict[str, float]:
  """Per-device memory of the full-depth step (the layers are one scan: compile time
  does not grow with depth)."""
  m = step_memory(config)
  return {
    "params": m["params"],
    "layers": config.model.n_layers,
    "peak_gib": m["peak"] / GIB,
    "state_and_batch_gib": m["arguments"] / GIB,
    "temp_gib": m["temp"] / GIB,
    "compile_s": m["compile_s"],
  }
