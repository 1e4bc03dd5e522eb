r"""Tiny: a model and run small enough for a unit test or a notebook smoke run on 2 CPU cores.

The tests and the quickstart notebook start from this file. It trains on the `source`
given after ':' (a directory of *.py files, a glob or a JSONL(.gz) of {"text": ...}
records; the standard library when omitted), with the byte tokenizer:

    python -m sdiff_jax.main --config=configs/tiny.py:/path/to/code --workdir=/tmp/sdiff_tiny
"""

from sdiff_jax.config_lib import default_config


def get_config(source: str = "stdlib"):
  c = default_config()
  c.data.source = source
  c.data.tokenizer = "byte"
  c.data.seq_len = 64
  c.data.valid_fraction = 0.2
  c.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64)
  c.diffusion.block_size = 16
  c.train.update(
    batch_size=8,
    num_steps=20,
    warmup_steps=2,
    log_every=5,
    eval_every=10,
    eval_batches=2,
    checkpoint_every=10,
  )
  return c
