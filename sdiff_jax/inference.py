"""Trained models from a workdir, text in and text out: the library behind the sampling
CLI (`sdiff_jax.sample`), the benchmarks and notebooks.

    loaded = inference.load_model("/tmp/sdiff_quickstart")
    texts, stats = inference.complete(loaded, ["def fibonacci(n):\n"], steps_per_block=4)
    print("\n".join(inference.trajectory_frames(loaded.tokenizer, stats)))

`complete` takes `sampling.Settings` fields as keywords; the model's attention mode and
block size are the defaults.
"""

import dataclasses
import json
import os
import time
from typing import Any, NamedTuple, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding

from sdiff_jax import checkpointing, config_lib, sampling, sharding
from sdiff_jax.data import tokenizer as tokenizer_lib
from sdiff_jax.objective import Objective

MASK_CHAR = "\u2591"  # one per still-masked token in trajectory frames
NEWLINE_CHAR = "\u21b5"  # newlines inside a frame


class Loaded(NamedTuple):
  """A workdir's config, tokenizer and (restored, sharded) parameters."""

  config: ml_collections.ConfigDict
  tokenizer: tokenizer_lib.Tokenizer
  params: Any


@dataclasses.dataclass
class Stats:
  """What one `generate` call did."""

  generation: sampling.Generation  # on the host: tokens, lengths, nfe, block_steps, commit_step
  settings: sampling.Settings
  prompt_ids: list[list[int]]  # BOS + prompt tokens of each row
  seconds: float  # wall time, compilation included on a first call

  @property
  def nfe(self) -> int:
    return int(self.generation.nfe)

  @property
  def tokens_per_forward(self) -> float:
    return self.generation.tokens_per_forward

  @property
  def tokens_per_s(self) -> float:
    return float(np.sum(self.generation.lengths)) / self.seconds


def _sampling_mesh(config: ml_collections.ConfigDict):
  """The training mesh if it fits the local devices, else all of them on `data`."""
  try:
    return sharding.make_mesh(config.mesh)
  except ValueError:
    fallback = ml_collections.ConfigDict(config.mesh.to_dict())
    for name in ("fsdp", "tensor", "dcn_data", "dcn_fsdp", "dcn_tensor"):
      fallback[name] = 1
    fallback.data = -1
    return sharding.make_mesh(fallback)


def load_model(workdir: str, step: int | None = None) -> Loaded:
  """`workdir`'s config, tokenizer and parameters of checkpoint `step` (default: the
  latest), sharded on its mesh when it fits this host, else over the local devices; the
  optimizer state is not read."""
  paths = checkpointing.Workdir(workdir)
  config = paths.read_config()
  tok = tokenizer_lib.load_tokenizer(paths.tokenizer)
  mesh = _sampling_mesh(config)
  objective = Objective(config, tok.vocab_size)
  boxed = jax.eval_shape(
    lambda key: objective.init_params(key, config.data.seq_len), jax.random.key(0)
  )
  abstract_params, _ = sharding.abstract_sharded(boxed, mesh, sharding.rules(config.mesh))
  step = checkpointing.latest_step(paths) if step is None else step
  vocab = checkpointing.saved_vocab_size(paths, step)
  if vocab is not None and vocab != tok.vocab_size:
    raise ValueError(
      f"tokenizer in {paths.tokenizer} has {tok.vocab_size} ids but checkpoint "
      f"step {step} has a vocabulary of {vocab}: they come from different runs"
    )
  params = checkpointing.restore_params(paths, step, abstract_params)
  return Loaded(config, tok, params)


def settings_for(
  config: ml_collections.ConfigDict,
  *,
  tokenizer: tokenizer_lib.Tokenizer | None = None,
  **overrides,
) -> sampling.Settings:
  """Sampling settings for a workdir's model: its attention mode and block size by default,
  and its tokenizer's stop ids when given."""
  defaults = {
    "attention": config.attention,
    "block_size": config.diffusion.block_size,
    "shift": bool(config.diffusion.shift) and config.attention != "causal",
    "stop_ids": tokenizer.stop_ids if tokenizer is not None else (),
  }
  settings = sampling.Settings(**{**defaults, **overrides})
  settings.validate()
  return settings


def encode_prompts(loaded: Loaded, prompts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
  """BOS + tokens of each prompt; a ValueError if a prompt does not fit the model's context."""
  context = loaded.config.data.seq_len
  ids = [[tokenizer_lib.BOS_ID] + loaded.tokenizer.encode(p) for p in prompts]
  if loaded.tokenizer.kind in ("bpe", "hf") and any(p[-1:].isspace() for p in prompts):
    logging.warning(
      "a prompt ends with whitespace: the BPE merges a newline with the next line's "
      "indentation, so the model rarely saw a token boundary there; completions are "
      "usually better from the prompt without it (e.g. 'def f(x):', not 'def f(x):\\n')"
    )
  for i, row in enumerate(ids):
    if len(row) + max_new_tokens > context:
      raise ValueError(
        f"prompt {i} is {len(row)} tokens (BOS included); with max_new_tokens={max_new_tokens} "
        f"that needs {len(row) + max_new_tokens} positions, but the model was trained on a "
        f"context of {context} (data.seq_len): shorten the prompt or lower max_new_tokens"
      )
  return ids


def complete(
  model: str | Loaded,
  prompts: Sequence[str],
  seed: int = 0,
  prompt_len: int | None = None,
  **settings: Any,
) -> tuple[list[str], Stats]:
  """Completions of `prompts` (text after the prompt, up to EOS) and what decoding took.

  `model` is a workdir or `load_model`'s result; `settings` are `sampling.Settings` fields.
  `prompt_len` pads every prompt (BOS included) to that many tokens: batches of other
  prompts then reuse one compilation.
  """
  loaded = load_model(model) if isinstance(model, (str, os.PathLike)) else model
  s = settings_for(loaded.config, tokenizer=loaded.tokenizer, **settings)
  ids = encode_prompts(loaded, prompts, s.max_new_tokens)
  prompt_BxP, lens_B = sampling.left_pad(ids, prompt_len)
  decoder = sampling.Decoder(config_lib.model_config(loaded.config, loaded.tokenizer.vocab_size))
  params_sharding = jax.tree.leaves(loaded.params)[0].sharding
  if isinstance(params_sharding, NamedSharding):  # rows over (data, fsdp) when they divide it
    mesh = params_sharding.mesh
    if len(ids) % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0:
      rows = sharding.batch_sharding(mesh)
      prompt_BxP, lens_B = jax.device_put(prompt_BxP, rows), jax.device_put(lens_B, rows)
  start = time.perf_counter()
  gen = jax.device_get(
    sampling.generate(decoder, loaded.params, prompt_BxP, lens_B, jax.random.key(seed), s)
  )
  seconds = time.perf_counter() - start
  texts = [loaded.tokenizer.decode(row[:n]) for row, n in zip(gen.tokens, gen.lengths)]
  return texts, Stats(gen, s, ids, seconds)


def trajectory_frames(tokenizer: tokenizer_lib.Tokenizer, stats: Stats, row: int = 0) -> list[str]:
  """One line per denoising forward of `row`: its block, MASK_CHAR for masked tokens.

  Built from the step that set each final token (self-corrected tokens show their final value).
  """
  gen, size = stats.generation, stats.settings.block_size
  frames = []
  for j, steps in enumerate(gen.block_steps):
    tokens_K = gen.tokens[row, j * size : (j + 1) * size]
    commit_K = gen.commit_step[row, j * size : (j + 1) * size]
    for step in range(int(steps)):
      pieces = [
        tokenizer.decode([t]) if 0 <= c <= step else MASK_CHAR
        for t, c in zip(tokens_K, commit_K)
        if c >= 0
      ]
      text = "".join(pieces).replace("\n", NEWLINE_CHAR)
      frames.append(f"block {j} step {step + 1}/{steps}: {text}")
  return frames


def read_prompts(path: str) -> list[str]:
  """Prompts of a text file (one per line) or JSONL (`prompt` or `text` field)."""
  with open(path, encoding="utf-8") as f:
    lines = [line.rstrip("\n") for line in f if line.strip()]
  if not path.endswith(".jsonl"):
    return [line.replace("\\n", "\n") for line in lines]
  prompts = []
  for n, line in enumerate(lines, 1):
    record = json.loads(line)
    if isinstance(record, str):
      prompts.append(record)
    elif isinstance(record, dict) and ("prompt" in record or "text" in record):
      prompts.append(record.get("prompt", record.get("text")))
    else:
      raise ValueError(f"{path}:{n}: expected a JSON string or an object with a 'prompt' field")
  return prompts
