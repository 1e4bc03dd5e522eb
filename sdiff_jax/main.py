r"""Main job: train a Seed Diffusion model from a config, then sample from it.

    python -m sdiff_jax.main --config=configs/quickstart.py --workdir=/tmp/sdiff
    python -m sdiff_jax.main --config=configs/quickstart.py:causal --workdir=/tmp/ar \
        --config.train.num_steps=100

Reruns with the same workdir resume from the latest checkpoint.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from sdiff_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (get_config).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, tokenizer and logs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, train.CheckpointError, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def run():
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
