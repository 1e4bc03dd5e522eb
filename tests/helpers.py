"""Test helpers importable without side effects (conftest sets XLA_FLAGS)."""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"

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


def run_module(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  """`python -m module args...` from the repository root, output captured as text."""
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
