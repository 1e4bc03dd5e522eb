r"""Per-device memory of a config's train step at its mesh, from XLA's compiled memory analysis.

    python -m sdiff_jax.bench.memory --config=configs/15b.py:gpu8 --devices=8 --json=FILE

Compiles for abstract inputs on simulated CPU devices (nothing is allocated).
The step is compiled with 1 and 2 layers; memory is affine in the layer count
(each layer adds the same parameters, optimizer state and saved activations),
so the full depth is extrapolated from the two. On CPU the attention is XLA's
(score matrices materialised); cuDNN's fused attention on GPU needs less.
"""

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Simulated CPU devices (the target device count).")
_JSON = flags.DEFINE_string("json", None, "Write the result here.")
flags.mark_flag_as_required("config")

GIB = 2**30


def step_memory(config, n_layers: int) -> dict[str, float]:
  """Bytes per device of one compiled train step (with the edit term) of `config`."""
  import jax
  import jax.numpy as jnp

  from sdiff_jax import config_lib, sharding, train

  config = config.copy_and_resolve_references()
  config.model.n_layers = n_layers
  config.model.attention_impl = ""  # cuDNN does not compile for CPU devices
  mesh = sharding.make_mesh(config.mesh)
  objective = train.Objective(config, config.data.vocab_size)
  tx = train.make_optimizer(config)
  abstract, shardings = train.abstract_train_state(objective, tx, mesh, sharding.rules(config.mesh),
                                                   config.data.seq_len)
  batch_sh = sharding.batch_sharding(mesh)
  shape = (config.train.batch_size, config.data.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh)
           for k in ("tokens", "segment_ids", "positions")}
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
  step = train.make_train_step(objective, tx, shardings, mesh, config.train.grad_accum_steps)
  start = time.perf_counter()
  analysis = step.lower(abstract, batch, key, with_edit=True).compile().memory_analysis()
  peak = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
          - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
  return {"peak": peak, "arguments": analysis.argument_size_in_bytes,
          "temp": analysis.temp_size_in_bytes, "compile_s": time.perf_counter() - start,
          "params": config_lib.model_config(config, config.data.vocab_size).num_params()}


def per_device_memory(config) -> dict[str, float]:
  """Per-device peak at the config's full depth, extrapolated from 1 and 2 layers."""
  one, two = step_memory(config, 1), step_memory(config, 2)
  layers = config.model.n_layers
  extrapolate = lambda k: one[k] + (two[k] - one[k]) * (layers - 1)
  from sdiff_jax import config_lib
  return {"params": config_lib.model_config(config, config.data.vocab_size).num_params(),
          "layers": layers, "peak_gib": extrapolate("peak") / GIB,
          "state_and_batch_gib": extrapolate("arguments") / GIB,
          "temp_gib": extrapolate("temp") / GIB, "compile_s": one["compile_s"] + two["compile_s"]}


def main(argv):
  del argv
  result = per_device_memory(_CONFIG.value)
  result["devices"] = _DEVICES.value
  print(f"{result['params'] / 1e9:.2f}B parameters, {result['layers']} layers, "
        f"{_DEVICES.value} devices: peak {result['peak_gib']:.1f} GiB per device "
        f"(state+batch {result['state_and_batch_gib']:.1f}, temporaries {result['temp_gib']:.1f}); "
        f"compiled in {result['compile_s']:.0f} s")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=2)


def run():
  # Simulated devices must be requested before JAX starts.
  count = next((a.split("=")[1] for a in sys.argv if a.startswith("--devices=")), "8")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={count}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  app.run(main)


if __name__ == "__main__":
  run()
