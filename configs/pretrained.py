r"""An imported model's own config, training from its parameters (`train.init_from`).

`python -m sdiff_jax.convert` writes the workdir (the source's model shape, its tokenizer as
kind "hf", data.seq_len, attention "causal"); this file returns that config with
`train.init_from` set to it, and data, attention and the run are overridden on the command
line as for any config. Adapting the causal source to diffusion (Dream and DiffuCoder keep
its next-token prediction: diffusion.shift):

    python -m sdiff_jax.convert --source=/models/SmolLM2-135M --workdir=/tmp/smollm2
    python -m sdiff_jax.main --config=configs/pretrained.py:/tmp/smollm2 \
        --workdir=/tmp/smollm2_diffusion --config.attention=bidirectional \
        --config.diffusion.shift=True --config.train.learning_rate=1e-4
"""

import os

from sdiff_jax import config_lib


def get_config(workdir: str):
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{path} is missing: import the model first, e.g. "
      f"python -m sdiff_jax.convert --source=smollm2 --workdir={workdir}"
    )
  with open(path) as f:
    c = config_lib.from_json(f.read())
  c.train.init_from = os.path.abspath(workdir)
  return c
