"""Test helpers importable without side effects (conftest sets XLA_FLAGS)."""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
# XLA's CPU backend without LLVM's optimisations: compiles several times faster (conftest)
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

_TEMPLATE = '''"""Module {i}: small helpers."""


def add_{i}(a, b):
    """Return a + b + {i}."""
    return a + b + {i}


class Counter{i}:
    def __init__(self):
        self.count = {i}

    def step(self, n=1):
        for _ in range(n):
            self.count += 1
        return self.count
'''


def write_code_corpus(directory: pathlib.Path, num_files: int = 40) -> pathlib.Path:
  """A deterministic directory of small Python files (independent of the interpreter)."""
  directory.mkdir(parents=True, exist_ok=True)
  for i in range(num_files):
    (directory / f"mod_{i:03d}.py").write_text(_TEMPLATE.format(i=i))
  return directory


def tiny_config(source: str, attention: str = "bidirectional", **train_overrides):
  """configs/tiny.py on `source`: a model and run small enough for a test on 2 CPU cores."""
  from sdiff_jax import config_lib

  c = config_lib.from_file(f"{CONFIGS}/tiny.py:{source}")
  c.attention = attention
  c.train.update(train_overrides)
  return c


def shifted_objective(source, **diffusion):
  """A tiny bidirectional model with the shifted prediction and `read_next` (Objective,
  vocab 64) and its parameters, perturbed so that every term, read_next's included, is
  non-zero; `diffusion` overrides config.diffusion fields."""
  import jax

  from sdiff_jax.objective import Objective

  config = tiny_config(source)
  config.diffusion.shift = config.model.read_next = True
  config.diffusion.update(diffusion)
  objective = Objective(config, 64)
  params = objective.init_params(jax.random.key(0), config.data.seq_len)
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
  return objective, params


def run_module(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  """`python -m module args...` from the repository root, output captured as text."""
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
