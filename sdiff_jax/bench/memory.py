r"""Per-device memory of a config's train step at its mesh, from XLA's compiled memory analysis.

    python -m sdiff_jax.bench.memory --config=configs/15b.py:gpu8 --devices=8 --json=FILE

Compiles the full-depth step for abstract inputs on `--devices` simulated CPU
devices (nothing is allocated; set JAX_PLATFORMS to measure on real devices).
See `bench.compiled` for how a GPU config's cuDNN attention is stood in for.
"""

import json
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from sdiff_jax.bench import compiled

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Simulated CPU devices (the target device count).")
_JSON = flags.DEFINE_string("json", None, "Write the result here.")
flags.mark_flag_as_required("config")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Before JAX starts a backend: the simulated devices (on the CPU unless JAX_PLATFORMS says).
  if "JAX_PLATFORMS" not in os.environ:
    jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", _DEVICES.value)
  result = compiled.per_device_memory(_CONFIG.value)
  devices = result["devices"] = _DEVICES.value
  print(
    f"{result['params'] / 1e9:.2f}B parameters, {result['layers']} layers, "
    f"{devices} devices: peak {result['peak_gib']:.1f} GiB per device "
    f"(state+batch {result['state_and_batch_gib']:.1f}, temporaries {result['temp_gib']:.1f}); "
    f"compiled in {result['compile_s']:.0f} s"
  )
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=2)


def run():
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
