"""Test helpers importable without side effects (conftest sets XLA_FLAGS)."""

import pathlib

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
  """A model and run small enough for a test on 2 CPU cores."""
  from sdiff_jax.config_lib import default_config

  c = default_config()
  c.data.source = str(source)
  c.data.tokenizer = "byte"
  c.data.seq_len = 64
  c.data.valid_fraction = 0.2
  c.model.attention = attention
  c.model.block_size = 16
  c.model.d_model = 32
  c.model.n_layers = 2
  c.model.n_heads = 2
  c.model.n_kv_heads = 1
  c.model.head_dim = 16
  c.model.d_ff = 64
  c.train.batch_size = 8
  c.train.num_steps = 20
  c.train.warmup_steps = 2
  c.train.log_every = 5
  c.train.eval_every = 10
  c.train.eval_batches = 2
  c.train.checkpoint_every = 10
  for k, v in train_overrides.items():
    c.train[k] = v
  return c
