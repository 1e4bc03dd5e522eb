r"""Per-device memory of a config's train step at its mesh, from XLA's compiled memory analysis.

    python -m sdiff_jax.bench.memory --config=configs/15b.py:gpu8 --devices=8 --json=FILE

Compiles the full-depth step for abstract inputs on simulated CPU devices
(nothing is allocated). cuDNN's fused attention does not compile for CPU
devices; a GPU config is measured with the query-chunked attention instead
(`attention_impl="chunked"`, 512 queries per chunk), which like cuDNN's keeps
memory linear in the sequence length (cuDNN holds less: no score chunk at all).
"""

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_FLAGS = {}  # defined by run(): importing this module (tests do) defines no flags


def _define_flags():
  _FLAGS["config"] = config_flags.DEFINE_config_file("config", None, "Config file.")
  _FLAGS["devices"] = flags.DEFINE_integer("devices", 8,
                                           "Simulated CPU devices (the target device count).")
  _FLAGS["json"] = flags.DEFINE_string("json", None, "Write the result here.")
  flags.mark_flag_as_required("config")

GIB = 2**30


def step_memory(config) -> dict[str, float]:
  """Bytes per device of one compiled train step (with the edit term) of `config`."""
  import jax
  import jax.numpy as jnp

  from sdiff_jax import config_lib, sharding, train

  config = config.copy_and_resolve_references()
  if config.model.attention_impl == "cudnn":  # cuDNN does not compile for CPU devices:
    config.model.attention_impl = "chunked"  # the chunked attention stands in (both O(T) memory)
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
  """Per-device memory of the full-depth step (the layers are one scan: compile time
  does not grow with depth)."""
  m = step_memory(config)
  return {"params": m["params"], "layers": config.model.n_layers, "peak_gib": m["peak"] / GIB,
          "state_and_batch_gib": m["arguments"] / GIB, "temp_gib": m["temp"] / GIB,
          "compile_s": m["compile_s"]}


def main(argv):
  del argv
  result = per_device_memory(_FLAGS["config"].value)
  devices = result["devices"] = _FLAGS["devices"].value
  print(f"{result['params'] / 1e9:.2f}B parameters, {result['layers']} layers, "
        f"{devices} devices: peak {result['peak_gib']:.1f} GiB per device "
        f"(state+batch {result['state_and_batch_gib']:.1f}, temporaries {result['temp_gib']:.1f}); "
        f"compiled in {result['compile_s']:.0f} s")
  if _FLAGS["json"].value:
    with open(_FLAGS["json"].value, "w") as f:
      json.dump(result, f, indent=2)


def run():
  # Simulated devices must be requested before JAX starts.
  count = next((a.split("=")[1] for a in sys.argv if a.startswith("--devices=")), "8")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={count}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
