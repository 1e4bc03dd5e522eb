"""Default configuration, loading saved configs, and up-front validation.

Every file in `configs/` starts from `default_config()` (or `sized_config()` for
the large sizes) and overrides fields. `config.model` holds exactly the fields of
`ModelConfig` but the vocabulary size, which the tokenizer decides:
`ModelConfig(**config.model, vocab_size=V)`. `validate()` runs before anything is
compiled and names the offending field.
"""

import importlib.util
import json
import os
from typing import Any

import ml_collections
from absl import logging

from sdiff_jax.losses import LOSS_WEIGHTINGS
from sdiff_jax.models.attention_masks import ATTENTION_MODES
from sdiff_jax.models.transformer import ATTENTION_IMPLS, DTYPES, ModelConfig

NONFINITE_POLICIES = ("stop", "skip")


def default_config() -> ml_collections.ConfigDict:
  """All fields with their defaults; a comment says what each one does."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # parameter init, data order and corruption noise
  c.attention = "bidirectional"  # "bidirectional" | "block_causal" | "causal" (the AR baseline)

  c.data = ml_collections.ConfigDict()
  # What the model trains on: "stdlib" (this interpreter's standard library), a directory
  # (its *.py files, recursively), a glob ("/src/**/*.py"), or a .jsonl(.gz) with a `text` field.
  c.data.source = "stdlib"
  c.data.valid_fraction = 0.05  # files (by path hash) held out for validation
  c.data.tokenizer = "bpe"  # "bpe" (trained on the training split) or "byte"
  c.data.vocab_size = 4096  # BPE vocabulary size, special tokens included
  c.data.tokenizer_max_bytes = 0  # the BPE learns from the first this many bytes (0: all)
  c.data.seq_len = 256  # tokens per training row
  c.data.packing = "pack"  # "pack" several documents per row, or "pad" one per row
  c.data.backend = "grain"  # "grain" over files, or "tfds" (ArrayRecord built from the files)
  c.data.tfds_data_dir = ""  # "" = <workdir>/tfds

  c.model = ml_collections.ConfigDict()  # the fields of models.ModelConfig but vocab_size
  c.model.d_model = 256
  c.model.n_layers = 4
  c.model.n_heads = 4
  c.model.n_kv_heads = 4  # < n_heads: grouped-query attention
  c.model.head_dim = 64
  c.model.d_ff = 1024  # SwiGLU hidden width
  c.model.rope_theta = 10_000.0
  c.model.norm_eps = 1e-6  # RMSNorm epsilon
  c.model.dtype = "float32"  # compute dtype: "float32" | "bfloat16" (parameters stay float32)
  c.model.tie_embeddings = False
  c.model.remat = False  # rematerialise each layer in the backward pass
  c.model.attention_impl = ""  # "" (XLA), "cudnn" (fused, NVIDIA GPUs), "chunked" (O(T) memory)
  c.model.attention_chunk = 512  # queries per chunk when attention_impl="chunked"
  c.model.scan_layers = True  # one nn.scan over the layers (decoding unrolls them itself)
  # bidirectional + diffusion.shift: output t also reads position t + 1's final state (the
  # target's own input), so keeping or correcting a visible token is learnable at once
  c.model.read_next = False
  c.model.qkv_bias = False  # biases on the query, key and value projections (imported Qwen2)

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.block_size = 32  # block length of block_causal training; sampling's default
  c.diffusion.gamma_schedule = "linear"  # mask probability gamma_t: linear | cosine | polyK
  c.diffusion.alpha_schedule = "linear"  # edit rate alpha_t in [0, alpha_max]
  c.diffusion.alpha_max = 0.1  # the paper's bound on the edit rate
  c.diffusion.edit_window = 4  # w: one edit per window of w + 1 tokens; a pair shifts <= w
  c.diffusion.edit_op_probs = (1 / 3, 1 / 3, 1 / 3)  # substitution, del-ins pair, ins-del pair
  c.diffusion.time_eps = 1e-3  # t ~ U(time_eps, 1)
  c.diffusion.antithetic = True  # evenly spaced t across the batch
  # The output at i-1 predicts token i, as an AR model's does (see objective.py; causal
  # models ignore it); sampling follows the model's setting.
  c.diffusion.shift = False
  # What the mask term trains on (the reported mask_bits are the ELBO either way): "elbo"
  # (gamma'/gamma-weighted NLL of the masked tokens per token) or "masked_mean" (the mean
  # NLL of the batch's masked tokens: no 1/t weight, lower variance; MaskGIT, LLaDA's SFT).
  c.diffusion.loss_weighting = "elbo"
  # Share of the mask term's rows trained as one step of block decoding: a clean prefix, a
  # block of block_size positions masked at rate gamma_t, nothing after it (the state every
  # block-sampler forward is in; i.i.d. masking of whole rows almost never produces it)
  c.diffusion.block_fraction = 0.0

  c.curriculum = ml_collections.ConfigDict()
  # Stages: "ar" (next-token loss on the same parameters, causal mask; needs
  # diffusion.shift) for the first ar_fraction of the steps, then "mask", then "mask+edit"
  # from edit_start_fraction on. Causal models train "ar" throughout.
  c.curriculum.ar_fraction = 0.0
  c.curriculum.edit_start_fraction = 0.8
  c.curriculum.edit_weight = 1.0  # weight of the edit term once it starts

  # Constrained-order distillation (a stage of its own, from a pre-trained workdir through
  # train.init_from): with `pool` set (a `python -m sdiff_jax.trajectories` output
  # directory), every step trains on (state, final) pairs of its selected trajectories.
  c.distill = ml_collections.ConfigDict()
  c.distill.pool = ""
  c.distill.edit_alpha = 0.05  # share of a state's tokens edited by f (edit_corrupt), fixed
  c.distill.visible_weight = 0.25  # weight of the re-check term at the state's visible tokens
  # Weight of the pre-training objective (mask ELBO + edit term) on real training rows,
  # added at every distill step: an anchor against collapse onto the pool (0: pairs only)
  c.distill.anchor_weight = 1.0

  # On-policy step reduction (a stage of its own, from a trained workdir through
  # train.init_from; sdiff_jax/onpolicy.py): with `enabled`, every step samples
  # trajectories from the current model with the threshold sampler below, rewards each
  # with verifier_weight * V(output) - length_weight * (the surrogate of its step count,
  # scaled to max_new_tokens), and takes a REINFORCE step on them (leave-one-out baseline
  # over the `samples` trajectories of a prompt), plus kl_weight times a KL estimate to the
  # starting model and anchor_weight times the pre-training loss.
  c.onpolicy = ml_collections.ConfigDict()
  c.onpolicy.enabled = False
  c.onpolicy.samples = 4  # trajectories per prompt; must divide train.batch_size
  c.onpolicy.num_prompts = 256  # function prompts (def + docstring) of the training split
  c.onpolicy.prompt_len = 64  # at most this many prompt tokens, BOS included (longer: skipped)
  c.onpolicy.max_new_tokens = 64
  c.onpolicy.steps_per_block = 8  # at most this many forwards per block ...
  c.onpolicy.threshold = 0.5  # ... committing also every masked token above this confidence
  c.onpolicy.temperature = 1.0  # 1: the policy is the model's own distribution
  # comma-separated: parse | varied | judge | tests (the task testbed's asserts); V: product
  c.onpolicy.verifiers = "parse,varied"
  # "varied": completions of this unigram entropy (bits) pass (64-token bodies of real
  # functions, quickstart BPE: 4.9 on average, 4.0 at the 10th percentile)
  c.onpolicy.min_entropy = 3.0
  c.onpolicy.judge = ""  # causal workdir of the judge verifier
  c.onpolicy.judge_bits = 6.0  # the judge passes completions at most this many bits/token
  c.onpolicy.verifier_weight = 1.0
  c.onpolicy.length_weight = 0.1
  c.onpolicy.advantage_clip = 1.0  # advantages are clipped to [-clip, clip]
  c.onpolicy.anchor_weight = 1.0  # pre-training loss on real rows, every step (0: none)
  c.onpolicy.kl_weight = 0.1  # KL to the train.init_from model at the sampled tokens (0: none)

  # The whole chain, `python -m sdiff_jax.chain`: pre-train (this config) -> trajectory
  # pool and selection -> distill -> on-policy, each stage in its own workdir.
  c.chain = ml_collections.ConfigDict()
  c.chain.pool_prompts = 64
  c.chain.pool_prompt_len = 64
  c.chain.pool_max_new_tokens = 64
  c.chain.pool_steps_per_block = (4, 8)
  c.chain.pool_samples = 2
  c.chain.keep = 1
  c.chain.distill_steps = 100
  c.chain.onpolicy_steps = 100
  c.chain.learning_rate = 3e-4  # distill and on-policy stages
  c.chain.warmup_steps = 10
  c.chain.eval_prompts = 32  # validity prompts per stage's evaluation (0: no evaluation)
  c.chain.eval_heldout_rows = 64  # held-out rows of its ELBO
  c.chain.eval_steps_per_block = (4,)  # beside the on-policy sampler's setting
  c.chain.eval_tasks = 64  # tasks per split (test, combos) on the task corpus (0: validity)
  c.chain.ar_workdir = ""  # a causal workdir evaluated beside the stages (stage "ar")

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000
  c.train.batch_size = 16  # global batch (rows of seq_len tokens)
  c.train.grad_accum_steps = 1  # micro-batches per optimizer step
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 100
  c.train.end_lr_fraction = 0.1  # cosine decay to this fraction of the peak
  c.train.weight_decay = 0.1
  c.train.grad_clip = 1.0
  c.train.b2 = 0.98
  c.train.log_every = 10
  c.train.eval_every = 200
  c.train.eval_batches = 8
  c.train.checkpoint_every = 200
  c.train.keep_checkpoints = 3
  c.train.nonfinite = "stop"  # on a NaN/Inf loss: "stop" the run, or "skip" the update
  # A trained workdir whose latest parameters start this run (same model shape, any
  # attention mode: e.g. an AR model adapted to diffusion); its tokenizer is reused.
  c.train.init_from = ""

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all remaining devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.dcn_data = 1  # across slices / nodes
  c.mesh.dcn_fsdp = 1
  c.mesh.dcn_tensor = 1
  c.mesh.logical_axis_rules = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
  )
  return c


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
  """The denoiser's shape and numerics: `config.model` and the tokenizer's vocabulary."""
  return ModelConfig(**config.model.to_dict(), vocab_size=vocab_size)


def from_file(spec: str) -> ml_collections.ConfigDict:
  """A config file's `get_config(arg)`, spelled as on the command line: `path.py[:arg]`."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} does not exist")
  module_spec = importlib.util.spec_from_file_location(f"sdiff_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


# Fields that moved since config.json files were first written: old path -> new path.
_MOVED = {
  ("model", "attention"): ("attention",),
  ("model", "block_size"): ("diffusion", "block_size"),
}


def from_json(text: str) -> ml_collections.ConfigDict:
  """A saved `config.json` (any version) as today's config.

  Fields the file lacks keep their defaults, moved fields are moved, fields that no
  longer exist are dropped with a warning; lists become tuples where the default is one.
  """
  saved = json.loads(text)
  for old, new in _MOVED.items():
    section = saved.get(old[0], {})
    if old[1] in section:
      value = section.pop(old[1])
      parent = saved
      for part in new[:-1]:
        parent = parent.setdefault(part, {})
      parent.setdefault(new[-1], value)
  config = default_config()
  _merge(config, saved, "")
  return config


def _tuples(value: Any) -> Any:
  return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _as_default_type(default: Any, value: Any) -> Any:
  if isinstance(default, tuple):
    return _tuples(value)
  if isinstance(default, float) and isinstance(value, int):
    return float(value)
  return value


def _merge(config: ml_collections.ConfigDict, saved: dict, prefix: str) -> None:
  for name, value in saved.items():
    if name not in config:
      logging.warning("config.json: field %s%s no longer exists; ignored", prefix, name)
    elif isinstance(config[name], ml_collections.ConfigDict):
      _merge(config[name], value, f"{prefix}{name}.")
    else:
      config[name] = _as_default_type(config[name], value)


def _fail(field: str, value, why: str):
  raise ValueError(f"config.{field}={value!r}: {why}")


def _choice(config, field: str, choices):
  value = config
  for part in field.split("."):
    value = value[part]
  if value not in choices:
    _fail(field, value, f"must be one of {tuple(choices)}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field; compiles nothing."""
  from sdiff_jax import schedules  # local: keeps this module light for configs/
  from sdiff_jax.data import pipeline
  from sdiff_jax.data import tokenizer as tokenizer_lib

  _choice(config, "attention", ATTENTION_MODES)
  _choice(config, "data.tokenizer", tokenizer_lib.KINDS)
  _choice(config, "data.packing", pipeline.PACKINGS)
  _choice(config, "data.backend", pipeline.BACKENDS)
  _choice(config, "model.dtype", tuple(DTYPES))
  _choice(config, "model.attention_impl", ATTENTION_IMPLS)
  _choice(config, "train.nonfinite", NONFINITE_POLICIES)
  _choice(config, "diffusion.loss_weighting", LOSS_WEIGHTINGS)
  for field, fn in (
    ("diffusion.gamma_schedule", schedules.get_gamma_schedule),
    (
      "diffusion.alpha_schedule",
      lambda n: schedules.get_alpha_schedule(n, config.diffusion.alpha_max),
    ),
  ):
    try:
      fn(config[field.split(".")[0]][field.split(".")[1]])
    except ValueError as e:
      raise ValueError(f"config.{field}: {e}") from None
  positive = (
    "data.seq_len",
    "diffusion.block_size",
    "model.attention_chunk",
    "model.d_model",
    "model.n_layers",
    "model.n_heads",
    "model.n_kv_heads",
    "model.head_dim",
    "model.d_ff",
    "train.num_steps",
    "train.batch_size",
    "train.grad_accum_steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.checkpoint_every",
    "train.keep_checkpoints",
  )
  for field in positive:
    section, name = field.split(".")
    if config[section][name] <= 0:
      _fail(field, config[section][name], "must be positive")
  nonnegative = (
    "train.learning_rate",
    "train.warmup_steps",
    "train.weight_decay",
    "train.grad_clip",
    "curriculum.edit_weight",
    "diffusion.time_eps",
    "data.valid_fraction",
    "data.tokenizer_max_bytes",
  )
  for field in nonnegative:
    section, name = field.split(".")
    if config[section][name] < 0:
      _fail(field, config[section][name], "must not be negative")
  m, d = config.model, config.data
  if d.tokenizer == "bpe" and d.vocab_size < tokenizer_lib.MIN_BPE_VOCAB:
    _fail(
      "data.vocab_size",
      d.vocab_size,
      f"a BPE vocabulary needs at least {tokenizer_lib.MIN_BPE_VOCAB} ids "
      f"(256 bytes + {tokenizer_lib.NUM_SPECIAL} specials)",
    )
  if config.attention == "block_causal" and d.seq_len % config.diffusion.block_size:
    _fail(
      "diffusion.block_size", config.diffusion.block_size, f"must divide data.seq_len={d.seq_len}"
    )
  if m.n_heads % m.n_kv_heads:
    _fail("model.n_kv_heads", m.n_kv_heads, f"must divide model.n_heads={m.n_heads}")
  if m.head_dim % 2:
    _fail("model.head_dim", m.head_dim, "must be even (rotary embedding)")
  cur = config.curriculum
  if not 0.0 <= cur.edit_start_fraction <= 1.0:
    _fail("curriculum.edit_start_fraction", cur.edit_start_fraction, "must be in [0, 1]")
  if not 0.0 <= cur.ar_fraction <= cur.edit_start_fraction:
    _fail(
      "curriculum.ar_fraction",
      cur.ar_fraction,
      f"must be in [0, edit_start_fraction={cur.edit_start_fraction}]",
    )
  if config.model.read_next and not (
    config.attention == "bidirectional" and config.diffusion.shift
  ):
    _fail(
      "model.read_next",
      True,
      "needs attention='bidirectional' and diffusion.shift=True (elsewhere position t + 1 "
      "holds the token that output t predicts)",
    )
  if cur.ar_fraction and config.attention == "bidirectional" and not config.diffusion.shift:
    _fail(
      "curriculum.ar_fraction",
      cur.ar_fraction,
      "an AR stage needs diffusion.shift=True (its outputs predict the next token)",
    )
  if cur.ar_fraction and config.attention == "block_causal":
    _fail("curriculum.ar_fraction", cur.ar_fraction, "is for bidirectional models")
  if config.distill.pool and config.attention == "causal":
    _fail("distill.pool", config.distill.pool, "distillation is for diffusion models")
  if config.distill.anchor_weight < 0:
    _fail("distill.anchor_weight", config.distill.anchor_weight, "must not be negative")
  if not 0.0 <= config.distill.edit_alpha <= config.diffusion.alpha_max:
    _fail(
      "distill.edit_alpha",
      config.distill.edit_alpha,
      f"must be in [0, diffusion.alpha_max={config.diffusion.alpha_max}]",
    )
  o = config.onpolicy
  if o.enabled:
    if config.attention == "causal":
      _fail("onpolicy.enabled", True, "on-policy step reduction is for diffusion models")
    if config.distill.pool:
      _fail("onpolicy.enabled", True, "a run is either a distill or an on-policy stage")
    if o.samples < 2 or config.train.batch_size % o.samples:
      _fail(
        "onpolicy.samples",
        o.samples,
        f"must be at least 2 (the baseline leaves one out) and divide "
        f"train.batch_size={config.train.batch_size}",
      )
    if o.prompt_len + o.max_new_tokens > config.data.seq_len:
      _fail(
        "onpolicy.max_new_tokens",
        o.max_new_tokens,
        f"+ onpolicy.prompt_len={o.prompt_len} exceeds data.seq_len={config.data.seq_len}",
      )
    unknown = set(o.verifiers.split(",")) - {"parse", "varied", "judge", "tests"}
    if unknown or not o.verifiers:
      _fail("onpolicy.verifiers", o.verifiers, "must list some of parse, varied, judge, tests")
    if o.kl_weight > 0 and not config.train.init_from:
      _fail("onpolicy.kl_weight", o.kl_weight, "anchors to train.init_from, which is not set")
    if "judge" in o.verifiers.split(",") and not o.judge:
      _fail("onpolicy.judge", o.judge, "the judge verifier needs a causal workdir")
    for name in (
      "length_weight",
      "verifier_weight",
      "anchor_weight",
      "advantage_clip",
      "kl_weight",
    ):
      if o[name] < 0:
        _fail(f"onpolicy.{name}", o[name], "must not be negative")
    if not 0.0 <= o.threshold <= 1.0:
      _fail("onpolicy.threshold", o.threshold, "must be in [0, 1]")
    if o.temperature <= 0:
      _fail("onpolicy.temperature", o.temperature, "must be positive (trajectories are sampled)")
  if not 0.0 <= config.diffusion.block_fraction <= 1.0:
    _fail("diffusion.block_fraction", config.diffusion.block_fraction, "must be in [0, 1]")
  if not 0.0 < config.diffusion.time_eps < 1.0:
    _fail("diffusion.time_eps", config.diffusion.time_eps, "must be in (0, 1)")
  window = config.diffusion.edit_window
  if window < 0:
    _fail("diffusion.edit_window", window, "must not be negative")
  if config.diffusion.alpha_max * (window + 1) > 1:
    _fail(
      "diffusion.alpha_max",
      config.diffusion.alpha_max,
      f"must be at most 1 / (edit_window + 1) = {1 / (window + 1):.3f}: each window of "
      "edit_window + 1 tokens holds at most one edit",
    )
  probs = tuple(config.diffusion.edit_op_probs)
  if len(probs) != 3 or min(probs) < 0 or sum(probs) <= 0:
    _fail(
      "diffusion.edit_op_probs", probs, "must be 3 non-negative weights (sub, del, ins), not all 0"
    )
  if config.train.batch_size % config.train.grad_accum_steps:
    _fail(
      "train.grad_accum_steps",
      config.train.grad_accum_steps,
      f"must divide train.batch_size={config.train.batch_size}",
    )
  for name in ("data", "fsdp", "tensor", "dcn_data", "dcn_fsdp", "dcn_tensor"):
    size = config.mesh[name]
    if size == 0 or size < -1:
      _fail(f"mesh.{name}", size, "must be a positive size or -1 (the remaining devices)")


STAGES = ("ar", "mask", "mask+edit", "distill", "onpolicy")  # the curriculum's stages, in order


def stage_starts(config: ml_collections.ConfigDict) -> dict[str, int]:
  """First step of each curriculum stage the run trains, in order (causal: "ar" only)."""
  steps = config.train.num_steps
  if config.attention == "causal":
    return {"ar": 0}
  if config.distill.pool:
    return {"distill": 0}
  if config.onpolicy.enabled:
    return {"onpolicy": 0}
  ar_end = int(round(config.curriculum.ar_fraction * steps))
  edit = int(round(config.curriculum.edit_start_fraction * steps))
  ranges = {"ar": (0, ar_end), "mask": (ar_end, edit), "mask+edit": (edit, steps)}
  return {name: start for name, (start, end) in ranges.items() if start < end}


def stage_at(config: ml_collections.ConfigDict, step: int) -> str:
  """The curriculum stage of training step `step` (0-based)."""
  return [name for name, start in stage_starts(config).items() if start <= step][-1]


# Meshes for the sized configs. `fsdp` shards parameters and optimizer state;
# `dcn_*` spans nodes / slices (set dcn_data to the number of nodes or slices).
MESH_PRESETS = {
  "cpu": dict(data=-1, fsdp=1, tensor=1),
  "gpu8": dict(data=1, fsdp=8, tensor=1),  # one node of 8 H100 / H200 / H20
  "gpu8_dp": dict(data=8, fsdp=1, tensor=1),  # one node, data parallel (small models)
  "gpu_multinode": dict(data=1, fsdp=8, tensor=1, dcn_data=2),  # 2 nodes x 8 GPUs
  "tpu_v5p": dict(data=1, fsdp=-1, tensor=1),  # a v5p slice, all chips fsdp
  "tpu_v5e": dict(data=1, fsdp=-1, tensor=1),  # a v5e slice (16 GB HBM / chip)
  "tpu_multislice": dict(data=1, fsdp=-1, tensor=1, dcn_data=2),  # 2 slices
}


def sized_config(
  model: dict, preset: str, seq_len: int, batch_size: int
) -> ml_collections.ConfigDict:
  """A large-model config: bf16 compute, remat, BPE 32k, the mesh of `preset`."""
  if preset not in MESH_PRESETS:
    raise ValueError(f"unknown mesh preset {preset!r}; valid: {tuple(MESH_PRESETS)}")
  c = default_config()
  c.data.vocab_size = 32768
  c.data.seq_len = seq_len
  c.model.update(model)
  c.model.dtype = "bfloat16"
  c.model.remat = True
  # cuDNN's fused attention on GPUs; elsewhere (TPU, CPU) our query-chunked XLA attention.
  c.model.attention_impl = "cudnn" if preset.startswith("gpu") else "chunked"
  c.train.batch_size = batch_size
  # GPU nodes: micro-batches of batch_size / 16 rows (2 per GPU on 8) bound activation
  # memory. TPU slices: one micro-batch; batch_size / grad_accum_steps must be a
  # multiple of the chips (256 rows: up to 256 chips; raise it for smaller slices' memory).
  c.train.grad_accum_steps = 16 if preset.startswith("gpu") else 1
  c.train.num_steps = 100_000
  c.train.learning_rate = 3e-4
  c.train.warmup_steps = 2000
  c.train.log_every = 50
  c.train.eval_every = 2000
  c.train.checkpoint_every = 1000
  c.mesh.update(dict(data=1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
  c.mesh.update(MESH_PRESETS[preset])
  return c
