r"""Sample from a trained workdir: prompts in, completions and decoding statistics out.

    python -m sdiff_jax.sample --workdir=/tmp/sdiff_quickstart --prompt="def fibonacci(n):"
    python -m sdiff_jax.sample --workdir=/tmp/sdiff_quickstart --prompt_file=prompts.jsonl \
        --steps_per_block=4 --show_trajectory

`--prompt_file` holds one prompt per line, or JSONL objects with a `prompt` (or
`text`) field. A notebook calls `load_model` and `generate` directly.
"""

import dataclasses
import json
import os
import sys
import time
from typing import Any, NamedTuple, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging
from etils import epath
from jax.sharding import NamedSharding

from sdiff_jax import config_lib, sampling, sharding, train
from sdiff_jax.data import tokenizer as tokenizer_lib

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


def _checkpoint_vocab(state_dir: str) -> int | None:
  """The embedding rows of a saved train state, from its metadata (None if unreadable)."""
  try:
    metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir))
    return int(metadata["params"]["embed"]["embedding"].shape[0])
  except Exception:  # an unexpected layout: restoring will say what is wrong
    return None


def load_model(workdir: str) -> Loaded:
  """Reads config.json, the tokenizer and the latest checkpoint's parameters of `workdir`."""
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir) or not os.listdir(workdir):
    raise FileNotFoundError(
        f"workdir {workdir} is missing or empty: train a model first, e.g. "
        f"python -m sdiff_jax.main --config=configs/quickstart.py --workdir={workdir}")
  config_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path} is missing: {workdir} is not a training workdir")
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  tok = tokenizer_lib.load_tokenizer(os.path.join(workdir, "tokenizer"))
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train the model first")
  mngr = train.checkpoint_manager(workdir, config)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train the model first")
  vocab = _checkpoint_vocab(os.path.join(workdir, "checkpoints", str(step), "state"))
  if vocab is not None and vocab != tok.vocab_size:
    raise ValueError(f"tokenizer in {workdir}/tokenizer has {tok.vocab_size} ids but checkpoint "
                     f"step {step} has a vocabulary of {vocab}: they come from different runs")

  mesh = _sampling_mesh(config)
  objective = train.Objective(config, tok.vocab_size)
  tx = train.make_optimizer(config)
  abstract, _ = train.abstract_train_state(objective, tx, mesh, sharding.rules(config.mesh),
                                           config.data.seq_len)
  state, _ = train.restore_checkpoint(mngr, step, abstract)
  mngr.close()
  return Loaded(config, tok, state.params)


def settings_for(config: ml_collections.ConfigDict, **overrides) -> sampling.Settings:
  """Sampling settings for a workdir's model: its attention mode and block size by default."""
  defaults = {"attention": config.model.attention, "block_size": config.model.block_size}
  settings = sampling.Settings(**{**defaults, **overrides})
  settings.validate()
  return settings


def encode_prompts(loaded: Loaded, prompts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
  """BOS + tokens of each prompt; a ValueError if a prompt does not fit the model's context."""
  context = loaded.config.data.seq_len
  ids = [[tokenizer_lib.BOS_ID] + loaded.tokenizer.encode(p) for p in prompts]
  for i, row in enumerate(ids):
    if len(row) + max_new_tokens > context:
      raise ValueError(
          f"prompt {i} is {len(row)} tokens (BOS included); with max_new_tokens={max_new_tokens} "
          f"that needs {len(row) + max_new_tokens} positions, but the model was trained on a "
          f"context of {context} (data.seq_len): shorten the prompt or lower max_new_tokens")
  return ids


def generate(model: str | Loaded, prompts: Sequence[str], seed: int = 0,
             **settings: Any) -> tuple[list[str], Stats]:
  """Completions of `prompts` (text after the prompt, up to EOS) and what decoding took.

  `model` is a workdir or `load_model`'s result; `settings` are `sampling.Settings` fields.
  """
  loaded = load_model(model) if isinstance(model, (str, os.PathLike)) else model
  s = settings_for(loaded.config, **settings)
  ids = encode_prompts(loaded, prompts, s.max_new_tokens)
  prompt_BxP, lens_B = sampling.left_pad(ids)
  decoder = sampling.Decoder(config_lib.model_config(loaded.config, loaded.tokenizer.vocab_size))
  params_sharding = jax.tree.leaves(loaded.params)[0].sharding
  if isinstance(params_sharding, NamedSharding):  # rows over (data, fsdp) when they divide it
    mesh = params_sharding.mesh
    if len(ids) % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0:
      rows = sharding.batch_sharding(mesh)
      prompt_BxP, lens_B = jax.device_put(prompt_BxP, rows), jax.device_put(lens_B, rows)
  start = time.perf_counter()
  gen = jax.device_get(sampling.generate(decoder, loaded.params, prompt_BxP, lens_B,
                                         jax.random.key(seed), s))
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
    tokens_K = gen.tokens[row, j * size:(j + 1) * size]
    commit_K = gen.commit_step[row, j * size:(j + 1) * size]
    for step in range(int(steps)):
      pieces = [tokenizer.decode([t]) if 0 <= c <= step else MASK_CHAR
                for t, c in zip(tokens_K, commit_K) if c >= 0]
      text = "".join(pieces).replace("\n", NEWLINE_CHAR)
      frames.append(f"block {j} step {step + 1}/{steps}: {text}")
  return frames


# ----------------------------------------------------------------------------- CLI

def _define_flags() -> None:
  """CLI flags, defined on use so that importing this module defines none."""
  flags.DEFINE_string("workdir", None, "Training workdir (config.json, tokenizer, checkpoints).")
  flags.DEFINE_string("prompt", None, "One prompt.")
  flags.DEFINE_string("prompt_file", None,
                      "A batch of prompts: one per line, or JSONL with a `prompt`/`text` field.")
  flags.DEFINE_integer("block_size", 0, "Tokens per block (0: the config's block_size).")
  flags.DEFINE_integer("steps_per_block", 8, "Most denoising forwards per block.")
  flags.DEFINE_float("threshold", None, "Also commit every masked token above this confidence.")
  flags.DEFINE_float("temperature", 0.0, "0: greedy.")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
  flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per prompt.")
  flags.DEFINE_integer("seed", 0, "Sampling key; the same seed gives the same output.")
  flags.DEFINE_bool("self_correction", False,
                    "Rewrite committed tokens the model replaces with high confidence.")
  flags.DEFINE_enum("cache_mode", "approx", sampling.CACHE_MODES,
                    "Bidirectional models: K/V of finished blocks.")
  flags.DEFINE_bool("show_trajectory", False,
                    "Print each block's state after every denoising step.")
  flags.mark_flag_as_required("workdir")


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


def main(argv):
  f = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if (f.prompt is None) == (f.prompt_file is None):
    raise app.UsageError("pass exactly one of --prompt and --prompt_file")
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs each restore step at INFO
  try:
    prompts = [f.prompt] if f.prompt is not None else read_prompts(f.prompt_file)
    if not prompts:
      raise ValueError(f"no prompts in {f.prompt_file}")
    loaded = load_model(f.workdir)
    overrides = dict(
        steps_per_block=f.steps_per_block, threshold=f.threshold, temperature=f.temperature,
        top_p=f.top_p, max_new_tokens=f.max_new_tokens, self_correction=f.self_correction,
        cache_mode=f.cache_mode)
    if f.block_size:
      overrides["block_size"] = f.block_size
    texts, stats = generate(loaded, prompts, seed=f.seed, **overrides)
  except (ValueError, FileNotFoundError, train.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  s = stats.settings
  for i, (prompt, text) in enumerate(zip(prompts, texts)):
    print(f"=== sample {i} ===")
    if f.show_trajectory and s.attention != "causal":
      print("\n".join(trajectory_frames(loaded.tokenizer, stats, i)))
      print("--- final ---")
    print(prompt + text)
  mode = "AR" if s.attention == "causal" else (
      f"{s.attention}, block {s.block_size}, <= {s.steps_per_block} steps/block")
  print(f"=== {len(prompts)} prompt(s), {mode}: {stats.nfe} forwards, "
        f"{stats.tokens_per_forward:.2f} tokens/forward, {stats.tokens_per_s:.1f} tokens/s "
        f"({stats.seconds:.2f} s, compilation included) ===")


def run():
  """Console-script entry point (sdiff-sample)."""
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
