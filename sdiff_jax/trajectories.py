r"""Trajectory pools and their selection by the model's own evidence bound: the data of
constrained-order distillation (Seed Diffusion section 3.2).

    python -m sdiff_jax.trajectories --workdir=/tmp/sdiff_quickstart --out=/tmp/pool \
        --num_prompts=256 --steps_per_block=4,8 --samples=2 --keep=1

A trajectory is one block-decoding run of the trained model from a prompt (a prefix of
a training document): the generated tokens and, for each, the denoising step of its block
that committed it (`sampling.Generation.commit_step`). These two give every state of the
run (`states`): before step s of block j, the blocks before j are final, block j holds the
tokens committed at steps < s and MASK elsewhere, nothing follows. Pools are sampled
without self-correction, so no committed token changes afterwards and the replay is exact.

Score (the selection criterion). Read as any-order autoregression, a trajectory fixes an
order of the generated tokens, and its log-likelihood under that order is one term of the
model's evidence lower bound (the ELBO is its expectation over orders). Scored exactly,
with no sampling: every generated token once, at the state of the step that committed it,

    score_bits(tau) = -(1/G) sum_(block j, step s) sum_(i committed at s) log2 p(x_i | state)

where p is the model's plain forward (`Objective.logits`, the training forward, not the
sampler's cache) on prompt + state, and G the generated tokens (EOS included). Lower bits
is a higher bound; `select` keeps the `keep` lowest-scoring trajectories of each prompt.

Records are JSON in ArrayRecord files (grain reads them with `ArrayRecordDataSource`):
one file per chunk of prompts and process, `pool.p<process>.c<chunk>.array_record`,
written to a temporary name and renamed, so an interrupted run resumes at the first
missing chunk. Prompts are sharded by process (document index modulo process count).

The "distill" training stage reads the selection (`DistillPairs`: a state of a kept
trajectory and its final tokens per row; the loss is `Objective.distill_loss`):

    python -m sdiff_jax.main --config=configs/quickstart.py --workdir=/tmp/distilled \
        --config.train.init_from=/tmp/sdiff_quickstart --config.distill.pool=/tmp/pool \
        --config.train.num_steps=300 --config.train.learning_rate=3e-4
"""

import dataclasses
import functools
import glob
import json
import math
import os
import sys
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from array_record.python import array_record_module as array_record

from sdiff_jax import config_lib, inference, sampling
from sdiff_jax.data import pipeline
from sdiff_jax.data import tasks as tasks_lib
from sdiff_jax.data import tokenizer as tokenizer_lib
from sdiff_jax.evaluate import validity
from sdiff_jax.objective import Objective

MASK = tokenizer_lib.MASK_ID
POOL_GLOB = "pool.p*.c*.array_record"
SELECTED = "selected.array_record"


@dataclasses.dataclass
class Trajectory:
  prompt_id: int  # document index in the training split
  prompt: list[int]  # BOS + the document's first tokens
  tokens: list[int]  # generated tokens, EOS included when sampled
  commit_step: list[int]  # per generated token: the step of its block that committed it
  block_size: int
  settings: dict[str, Any]  # the sampler settings that differ from the defaults, and seed
  score_bits: float = math.nan  # see the module docstring; lower is a higher bound

  def to_bytes(self) -> bytes:
    return json.dumps(dataclasses.asdict(self)).encode()

  @classmethod
  def from_bytes(cls, data: bytes) -> "Trajectory":
    return cls(**json.loads(data))


def states(tokens: Sequence[int], commit_step: Sequence[int], block_size: int) -> Iterator:
  """(block j, step s, state, committed) before every step that committed a token: state is
  int32[end of block j] (MASK where not yet committed), committed bool[same] marks the
  tokens step s commits."""
  tokens_G, commit_G = np.asarray(tokens, np.int32), np.asarray(commit_step, np.int32)
  if tokens_G.shape != commit_G.shape or np.any(commit_G < 0):
    raise ValueError("tokens and commit_step must match, every token committed")
  for j in range(math.ceil(tokens_G.size / block_size)):
    end = min((j + 1) * block_size, tokens_G.size)
    block_commit = commit_G[j * block_size : end]
    for s in np.unique(block_commit):
      state = tokens_G[:end].copy()
      in_block = np.arange(end) >= j * block_size
      state[in_block] = np.where(block_commit >= s, MASK, state[in_block])
      committed = np.zeros(end, bool)
      committed[in_block] = block_commit == s
      yield j, int(s), state, committed


LENGTH_BUCKET = 64  # `score` pads its state rows to a multiple of this many tokens


@functools.partial(jax.jit, static_argnums=0)
def _committed_bits(objective: Objective, params, batch, committed_BxL) -> jax.Array:
  """float32[B]: bits of the committed tokens (`batch["tokens"]`) of each state row
  (`batch["noisy"]`: MASK where not committed yet, the committed tokens included)."""
  nll_BxL = objective.state_nll(params, batch["noisy"], batch)
  return jnp.where(committed_BxL, nll_BxL, 0).sum(axis=1) / math.log(2)


def score(
  objective: Objective, params, trajectories: Sequence[Trajectory], chunk: int = 16
) -> list[float]:
  """`score_bits` of each trajectory (module docstring), batched over all their states."""
  rows, owner = [], []
  for n, t in enumerate(trajectories):
    if not t.tokens:
      raise ValueError(f"trajectory {n} (prompt {t.prompt_id}) generated no tokens")
    for _, _, state, committed in states(t.tokens, t.commit_step, t.block_size):
      clean = np.concatenate([t.prompt, t.tokens[: state.size]])
      noisy = np.concatenate([t.prompt, state])
      mark = np.concatenate([np.zeros(len(t.prompt), bool), committed])
      rows.append((clean, noisy, mark))
      owner.append(n)
  # one compilation for every call whose rows fit the same bucket: lengths rounded up to
  # LENGTH_BUCKET, the row count to a multiple of `chunk` (copies of row 0, dropped below)
  length = -(-max(r[0].size for r in rows) // LENGTH_BUCKET) * LENGTH_BUCKET
  real = len(rows)
  rows += [rows[0]] * (-real % chunk)
  pad = lambda x, fill: np.pad(x, (0, length - x.size), constant_values=fill)  # noqa: E731
  batch = {
    "tokens": np.stack([pad(c, tokenizer_lib.PAD_ID) for c, _, _ in rows]).astype(np.int32),
    "noisy": np.stack([pad(x, tokenizer_lib.PAD_ID) for _, x, _ in rows]).astype(np.int32),
    "segment_ids": np.stack([pad(np.ones(c.size, np.int32), 0) for c, _, _ in rows]),
    "positions": np.tile(np.arange(length, dtype=np.int32), (len(rows), 1)),
  }
  committed = np.stack([pad(m, False) for _, _, m in rows])
  bits = []
  for first in range(0, len(rows), chunk):
    part = {k: jnp.asarray(v[first : first + chunk]) for k, v in batch.items()}
    bits.append(
      np.asarray(
        _committed_bits(objective, params, part, jnp.asarray(committed[first : first + chunk]))
      )
    )
  total = np.zeros(len(trajectories))
  np.add.at(total, np.asarray(owner), np.concatenate(bits)[:real])
  return [float(b / len(t.tokens)) for b, t in zip(total, trajectories)]


def document_prompts(
  loaded: inference.Loaded,
  prompt_len: int,
  max_new_tokens: int,
  num_prompts: int,
  process_index: int = 0,
  process_count: int = 1,
) -> list[tuple[int, list[int]]]:
  """(document index, BOS + first `prompt_len` tokens) of training documents long enough
  to continue for `max_new_tokens`, this process's share (index modulo process count).

  On the task corpus (`data.source="tasks"`) a prompt is instead a task's own prompt: its
  helper, `def` line and docstring (at most `prompt_len` tokens), as the tasks suite and
  the on-policy stage prompt, so that the trajectories are function bodies."""
  if prompt_len + 1 + max_new_tokens > loaded.config.data.seq_len:
    raise ValueError(
      f"prompt_len={prompt_len} + BOS + max_new_tokens={max_new_tokens} exceeds the model's "
      f"context of {loaded.config.data.seq_len} (data.seq_len)"
    )
  on_tasks = tasks_lib.is_source(loaded.config.data.source)
  prompts = []
  for index, text in enumerate(pipeline.load_texts(loaded.config.data, "train")):
    if len(prompts) == num_prompts:
      break
    if index % process_count != process_index:
      continue
    if on_tasks:
      items = validity.function_prompts([text], 1)
      ids = loaded.tokenizer.encode(items[0].context + items[0].prompt) if items else []
      if ids and len(ids) <= prompt_len:
        prompts.append((index, [tokenizer_lib.BOS_ID] + ids))
      continue
    ids = loaded.tokenizer.encode(text)
    if len(ids) >= prompt_len + max_new_tokens:
      prompts.append((index, [tokenizer_lib.BOS_ID] + ids[:prompt_len]))
  return prompts


@dataclasses.dataclass(frozen=True)
class PoolOptions:
  num_prompts: int = 64  # per process
  prompt_len: int = 64  # document tokens before the generation (BOS added)
  max_new_tokens: int = 64
  steps_per_block: Sequence[int] = (4, 8)
  samples: int = 2  # trajectories per prompt and steps_per_block value (seeds 0..samples-1)
  temperature: float = 0.8  # > 0: the samples of one setting differ
  top_p: float = 0.95
  chunk_prompts: int = 16  # prompts per file (and per sampler batch)


def _chunk_path(out: str, process: int, chunk: int) -> str:
  return os.path.join(out, f"pool.p{process:03d}.c{chunk:05d}.array_record")


def build_pool(workdir: str, out: str, o: PoolOptions, log=print) -> list[str]:
  """Samples and scores the trajectories of this process's prompts into `out` (resumes at
  the first missing chunk); the paths of this process's chunk files."""
  loaded = inference.load_model(workdir)
  if loaded.config.attention == "causal":
    raise ValueError(f"{workdir} holds a causal model: trajectories need a diffusion model")
  objective = Objective(loaded.config, loaded.tokenizer.vocab_size)
  os.makedirs(out, exist_ok=True)
  process, count = jax.process_index(), jax.process_count()
  prompts = document_prompts(loaded, o.prompt_len, o.max_new_tokens, o.num_prompts, process, count)
  if not prompts:
    raise ValueError(
      f"no training task's prompt fits prompt_len={o.prompt_len} tokens: raise it"
      if tasks_lib.is_source(loaded.config.data.source)
      else f"no training document has {o.prompt_len + o.max_new_tokens} tokens: lower prompt_len"
    )
  chunks = [prompts[i : i + o.chunk_prompts] for i in range(0, len(prompts), o.chunk_prompts)]
  decoder = sampling.Decoder(config_lib.model_config(loaded.config, loaded.tokenizer.vocab_size))
  paths, start = [], time.perf_counter()
  done = 0
  for c, chunk in enumerate(chunks):
    path = _chunk_path(out, process, c)
    paths.append(path)
    if os.path.exists(path):
      continue
    records = []
    for steps in o.steps_per_block:
      for seed in range(o.samples):
        settings = dict(
          steps_per_block=steps,
          max_new_tokens=o.max_new_tokens,
          temperature=o.temperature,
          top_p=o.top_p,
        )
        ids = [p for _, p in chunk]
        prompt_BxP, lens_B = sampling.left_pad(ids)
        s = inference.settings_for(loaded.config, tokenizer=loaded.tokenizer, **settings)
        gen = jax.device_get(
          sampling.generate(decoder, loaded.params, prompt_BxP, lens_B, jax.random.key(seed), s)
        )
        for row, (prompt_id, prompt) in enumerate(chunk):
          n = int(gen.lengths[row])
          records.append(
            Trajectory(
              prompt_id=prompt_id,
              prompt=prompt,
              tokens=[int(t) for t in gen.tokens[row, :n]],
              commit_step=[int(t) for t in gen.commit_step[row, :n]],
              block_size=s.block_size,
              settings={**settings, "seed": seed},
            )
          )
    for t, bits in zip(records, score(objective, loaded.params, records)):
      t.score_bits = bits
    _write(path, records)
    done += 1
    elapsed = time.perf_counter() - start
    log(
      f"trajectories: chunk {c + 1}/{len(chunks)} ({len(records)} trajectories), "
      f"{elapsed:.0f} s, ETA {elapsed / done * (len(chunks) - c - 1):.0f} s"
    )
  return paths


def _write(path: str, records: Sequence[Trajectory]) -> None:
  temporary = path + ".tmp"
  writer = array_record.ArrayRecordWriter(temporary, "group_size:1")
  for t in records:
    writer.write(t.to_bytes())
  writer.close()
  os.replace(temporary, path)


def read(paths: Sequence[str]) -> list[Trajectory]:
  """Every trajectory of these ArrayRecord files."""
  out = []
  for path in paths:
    reader = array_record.ArrayRecordReader(path)
    try:
      out += [Trajectory.from_bytes(r) for r in reader.read_all()]
    finally:
      reader.close()
  return out


class DistillPairs:
  """Endless batches of (state, final) pairs of selected trajectories, for the "distill"
  stage: each row a uniformly drawn trajectory at a uniformly drawn state (`states`),
  prompt + state in `state`, prompt + the final tokens up to the state's end in `tokens`
  (int32[B, L], L the pool's longest prompt + generation; PAD and segment 0 after).
  Batch n depends on (seed, process, n) only: the iterator state is n."""

  def __init__(self, paths: Sequence[str], batch_size: int, seed: int, max_len: int):
    self.pool = read(paths)
    if not self.pool:
      raise ValueError(f"no trajectories in {list(paths)}")
    self.length = max(len(t.prompt) + len(t.tokens) for t in self.pool)
    if self.length > max_len:
      raise ValueError(
        f"trajectories of {self.length} tokens (prompt + generation) exceed the model's "
        f"context of {max_len} (data.seq_len)"
      )
    self.states = [list(states(t.tokens, t.commit_step, t.block_size)) for t in self.pool]
    self.batch_size, self.seed, self.batch = batch_size, seed, 0

  def __iter__(self) -> "DistillPairs":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, jax.process_index(), self.batch])
    self.batch += 1
    out = {
      name: np.zeros((self.batch_size, self.length), np.int32)
      for name in ("tokens", "state", "segment_ids", "positions")
    }
    for row in range(self.batch_size):
      n = int(rng.integers(len(self.pool)))
      t = self.pool[n]
      _, _, state, _ = self.states[n][int(rng.integers(len(self.states[n])))]
      size = len(t.prompt) + state.size
      out["tokens"][row, :size] = t.prompt + t.tokens[: state.size]
      out["state"][row, :size] = np.concatenate([t.prompt, state])
      out["segment_ids"][row, :size] = 1
      out["positions"][row, :size] = np.arange(size)
    return out

  def get_state(self) -> dict[str, int]:
    return {"batch": self.batch}

  def set_state(self, state: dict[str, int]) -> None:
    self.batch = int(state["batch"])


class WithPairs:
  """Pre-training batches with `DistillPairs`' rows alongside (keys `pair_*`): what the
  "distill" stage reads (the anchor's rows and the pairs); both resume from its state."""

  def __init__(self, data, pairs: DistillPairs):
    self.data, self.pairs = data, pairs

  def __iter__(self) -> "WithPairs":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = dict(next(self.data))
    batch.update({f"pair_{k}": v for k, v in next(self.pairs).items()})
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"data": self.data.get_state(), "pairs": self.pairs.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    self.data.set_state(state["data"])
    self.pairs.set_state(state["pairs"])


def selected_paths(pool_dir: str) -> list[str]:
  """The selection file of a pool directory; a FileNotFoundError saying how to build it."""
  path = os.path.join(pool_dir, SELECTED)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"distill.pool={pool_dir} has no {SELECTED}: build it with "
      f"python -m sdiff_jax.trajectories --workdir=PRETRAINED --out={pool_dir}"
    )
  return [path]


def _summary(bits: Sequence[float]) -> dict[str, float]:
  if not bits:
    return {"count": 0}
  q = np.quantile(bits, [0.1, 0.5, 0.9])
  return {"count": len(bits), "mean": float(np.mean(bits)), "p10": q[0], "p50": q[1], "p90": q[2]}


def select(pool: Sequence[Trajectory], keep: int) -> tuple[list[Trajectory], dict[str, Any]]:
  """The `keep` lowest-bit (highest-bound) trajectories of each prompt, and the score
  distribution of the kept and the dropped ones."""
  if keep < 1:
    raise ValueError(f"keep={keep}: keep at least one trajectory per prompt")
  by_prompt: dict[int, list[Trajectory]] = {}
  for t in pool:
    by_prompt.setdefault(t.prompt_id, []).append(t)
  kept, dropped = [], []
  for prompt_id in sorted(by_prompt):
    ranked = sorted(by_prompt[prompt_id], key=lambda t: t.score_bits)
    kept += ranked[:keep]
    dropped += ranked[keep:]
  report = {
    "prompts": len(by_prompt),
    "kept": _summary([t.score_bits for t in kept]),
    "dropped": _summary([t.score_bits for t in dropped]),
    "kept_steps_per_block": _count(t.settings["steps_per_block"] for t in kept),
  }
  return kept, report


def write_selection(out: str, keep: int) -> dict[str, Any]:
  """Selects from every pool file in `out` into its selection file (`selected_paths`)
  and `selection.json`; the report."""
  kept, report = select(read(sorted(glob.glob(os.path.join(out, POOL_GLOB)))), keep)
  _write(os.path.join(out, SELECTED), kept)
  with open(os.path.join(out, "selection.json"), "w") as f:
    json.dump(report, f, indent=1)
  return report


def _count(values) -> dict[str, int]:
  counts: dict[str, int] = {}
  for v in values:
    counts[str(v)] = counts.get(str(v), 0) + 1
  return counts


def main(argv: Sequence[str] | None = None) -> None:
  import argparse

  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--workdir", required=True, help="trained diffusion workdir")
  p.add_argument("--out", required=True, help="directory of the pool files and the selection")
  p.add_argument("--keep", type=int, default=1, help="trajectories kept per prompt")
  defaults = PoolOptions()
  p.add_argument("--num_prompts", type=int, default=defaults.num_prompts)
  p.add_argument("--prompt_len", type=int, default=defaults.prompt_len)
  p.add_argument("--max_new_tokens", type=int, default=defaults.max_new_tokens)
  p.add_argument("--steps_per_block", default=",".join(map(str, defaults.steps_per_block)))
  p.add_argument("--samples", type=int, default=defaults.samples)
  p.add_argument("--temperature", type=float, default=defaults.temperature)
  p.add_argument("--top_p", type=float, default=defaults.top_p)
  p.add_argument("--chunk_prompts", type=int, default=defaults.chunk_prompts)
  a = p.parse_args(argv)
  options = PoolOptions(
    num_prompts=a.num_prompts,
    prompt_len=a.prompt_len,
    max_new_tokens=a.max_new_tokens,
    steps_per_block=tuple(int(s) for s in a.steps_per_block.split(",")),
    samples=a.samples,
    temperature=a.temperature,
    top_p=a.top_p,
    chunk_prompts=a.chunk_prompts,
  )
  try:
    build_pool(a.workdir, a.out, options, log=lambda m: print(m, file=sys.stderr, flush=True))
    if jax.process_index() != 0:
      return
    print(json.dumps(write_selection(a.out, a.keep), indent=1))
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
