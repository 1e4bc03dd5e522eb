r"""Adapt an imported AR model to block diffusion: SmolLM2-135M-Instruct by default.

The recipe (Fast-dLLM v2 and SDAR adapt AR models the same way; Dream and DiffuCoder keep
the shifted prediction too):
  * attention "block_causal": the clean prefix is read token-causally, exactly as the
    source model read it, so the AR model's KV cache and prefill carry over unchanged;
    only the noisy block is new to it (its own block bidirectional);
  * diffusion.shift: the output at i-1 predicts token i, as the source's does. A block's
    first token is predicted from the clean token before it: the source's own next-token
    prediction, so at one token per forward the adapted model starts as the AR model;
  * block_size 8: sampled at 8 / 4 / 2 / 1 steps per block, that is 1, 2, 4 and 8
    tokens per forward, with the block size it trained on;
  * mask, then mask + edit for the last 20% of the steps (the curriculum), the mask term
    as the masked tokens' mean NLL (`masked_mean`: no 1/t weight, lower variance in a
    short run);
  * a small learning rate with a short warm-up: the model is trained already.

The argument is the import's workdir (`python -m sdiff_jax.convert`), optionally followed
by a preset after a comma: "cpu" (default; this 2-core machine, about one hour) or
"gpu8" (one 8-GPU node: fsdp, bf16, remat, longer rows). "smollm2" instead of a workdir
gives SmolLM2-135M's shape without parameters (memory and compile checks).

    python -m sdiff_jax.convert --source=smollm2 --workdir=/tmp/smollm2
    python -m sdiff_jax.main --config=configs/adapt_smollm2.py:/tmp/smollm2 \
        --workdir=/tmp/smollm2_adapted
    python -m sdiff_jax.evaluate --workdir=/tmp/smollm2_adapted --suites=validity,tasks \
        --steps_per_block=8,4,2,1
    # left to right, committing the run of tokens above a confidence threshold: after the
    # CPU hour, parse rate 0.281 at 1.87 tokens per forward against 0.031 at 1.97 with 4
    # fixed steps per block (README, "Adapting a pretrained model")
    python -m sdiff_jax.evaluate --workdir=/tmp/smollm2_adapted --suites=validity \
        --order=left_to_right --steps_per_block=8 --threshold=0.9,0.7,0.5,0.3
"""

import os

from sdiff_jax import config_lib

# What `convert --source=smollm2` writes (SmolLM2-135M: Llama, tied embeddings, GQA 9/3).
SMOLLM2_135M = dict(
  d_model=576,
  n_layers=30,
  n_heads=9,
  n_kv_heads=3,
  head_dim=64,
  d_ff=1536,
  rope_theta=100_000.0,
  norm_eps=1e-5,
  tie_embeddings=True,
)
SMOLLM2_VOCAB = 49_152 + 4  # source ids + our four specials


def _imported(workdir: str):
  if workdir == "smollm2":
    c = config_lib.default_config()
    c.model.update(SMOLLM2_135M)
    c.data.tokenizer, c.data.vocab_size = "hf", SMOLLM2_VOCAB
    return c
  # the import's own config, training from its parameters: configs/pretrained.py
  return config_lib.from_file(
    f"{os.path.join(os.path.dirname(__file__), 'pretrained.py')}:{workdir}"
  )


def get_config(arg: str = "/tmp/smollm2"):
  workdir, _, preset = arg.partition(",")
  preset = preset or "cpu"
  if preset not in ("cpu", "gpu8"):
    raise ValueError(f"unknown preset {preset!r} in {arg!r}; valid: cpu, gpu8")
  c = _imported(workdir)
  c.attention = "block_causal"
  c.diffusion.shift = True
  c.diffusion.block_size = 8
  c.diffusion.loss_weighting = "masked_mean"
  c.curriculum.edit_start_fraction = 0.8
  c.data.source = "stdlib"
  c.train.learning_rate = 1e-4
  c.train.warmup_steps = 10
  c.train.end_lr_fraction = 0.1
  c.train.weight_decay = 0.0
  c.train.log_every = 5
  if preset == "cpu":  # 8 rows x 256 tokens (x2: [x_t ; x_0]) in micro-batches of 2 rows:
    # 10 GB; ~32 s a mask step, ~62 s a mask+edit step on 2 cores: 96 steps, about an hour
    c.data.seq_len = 256
    c.train.batch_size = 8
    c.train.grad_accum_steps = 4
    c.train.num_steps = 96
    c.train.eval_every = 48
    c.train.eval_batches = 2
    c.train.checkpoint_every = 16
  else:  # one 8-GPU node: fsdp over the 8 devices, 64 rows x 1024 tokens a step
    c.data.seq_len = 1024
    c.train.batch_size = 64
    c.train.grad_accum_steps = 2
    c.train.num_steps = 2000
    c.train.warmup_steps = 50
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.attention_impl = "cudnn"
    c.mesh.update(config_lib.MESH_PRESETS["gpu8"])
  return c
