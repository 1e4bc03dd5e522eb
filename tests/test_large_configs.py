"""Each large config's train step compiles at full depth for its 8-GPU mesh and fits.

The step is lowered for abstract inputs on the 8 simulated CPU devices (nothing
is allocated) and XLA's compiled memory analysis gives the per-device peak. The
layers are one scan, so full depth compiles as fast as one layer (~15 s each).

Target: an 80 GB H100 (79.6 GiB visible) of which the launch scripts let XLA take
92% (XLA_PYTHON_CLIENT_MEM_FRACTION=0.92): 73.2 GiB. cuDNN attention does not
compile for CPU; the query-chunked attention stands in for it (see bench/compiled.py).
"""

import importlib.util
import pathlib

import jax
import pytest

from sdiff_jax import config_lib
from sdiff_jax.bench import compiled

CONFIGS = pathlib.Path(__file__).parent.parent / "configs"
H100_BUDGET_GIB = 0.92 * 79.6


def _config(name: str, preset: str):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


@pytest.mark.compile
@pytest.mark.parametrize("name,params_b", [("1b", 0.98), ("8b", 7.25), ("15b", 15.2)])
def test_large_config_fits_an_h100_node(name, params_b):
  assert jax.device_count() == 8
  config = _config(name, "gpu8")
  config_lib.validate(config)
  result = compiled.per_device_memory(config)
  assert result["params"] / 1e9 == pytest.approx(params_b, rel=0.01)
  # Parameters + two Adam moments in float32, sharded 8 ways, are a floor.
  assert result["state_and_batch_gib"] >= 12 * result["params"] / 8 / compiled.GIB
  assert result["peak_gib"] < H100_BUDGET_GIB, result


@pytest.mark.compile
def test_adapt_smollm2_compiles_for_an_8_gpu_node():
  """The adaptation recipe on SmolLM2-135M's shape (no import needed): block_causal +
  shift, the mask+edit step, fsdp over 8 devices, bf16, remat."""
  assert jax.device_count() == 8
  config = _config("adapt_smollm2", "smollm2,gpu8")
  config_lib.validate(config)
  assert config.attention == "block_causal" and config.diffusion.shift
  result = compiled.per_device_memory(config)
  assert result["params"] / 1e6 == pytest.approx(134.5, rel=0.01)
  assert result["peak_gib"] < H100_BUDGET_GIB, result
  with pytest.raises(FileNotFoundError, match="sdiff_jax.convert --source=smollm2"):
    _config("adapt_smollm2", "/nonexistent/import")


def test_micro_batch_must_split_over_the_devices():
  config = _config("1b", "gpu8")
  config.train.batch_size, config.train.grad_accum_steps = 32, 8  # 4 rows over 8 devices
  with pytest.raises(ValueError, match="multiple of 8"):
    compiled.step_memory(config)
