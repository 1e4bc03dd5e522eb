r"""One prepared run that checks the accelerator path: attention kernels, a train step, decoding.

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 python -m sdiff_jax.bench.accelerator \
        --json=/tmp/accelerator.json
    python -m sdiff_jax.bench.accelerator --tiny --json=/tmp/accelerator_tiny.json  # any CPU

Made for a short GPU slot: one command, one JSON file (--json), a markdown table per
section, each section measured on configs/1b.py's shape (--tiny: configs/tiny.py's, random
batches, seconds on a CPU):

* attention: each attention implementation that applies here ("chunked"; "cudnn" on GPUs)
  against "xla" on the training masks (bidirectional over two packed documents,
  block_causal on [x_t ; x_0], causal), with the config's GQA heads, dtype and sequence
  length: the largest absolute difference of a 2-layer model's logits and of its parameter
  gradients, and whether the compiled step holds cuDNN's fused kernel. One more cudnn row in
  float32, which cuDNN refuses (as a CPU refuses cudnn at all): the model falls back to
  XLA's attention with a warning (recorded) and gives XLA's numbers.
* training: the config's train step on one device, dtype and remat as configured: the
  largest per-device batch that fits (tried in descending order; a batch whose compiled
  step XLA's memory analysis puts over the device's limit, or that runs out of memory at
  compile or at its first step, is passed over), then tokens/s and MFU in stages "mask" and
  "mask+edit" (FLOPs in roofline.py), the compiled step's memory analysis, and
  bench.compiled.step_memory's estimate for the same batch (the chunked attention in place
  of cuDNN's, compiled on this backend).
* decoding: random weights of the config's shape, decoding dtype as configured: AR and
  block decoding at each steps per block, per batch size: tokens/s, NFE, ms per forward
  against the memory roofline (the bytes a forward must read at a measured copy bandwidth).

Where the config asks for cuDNN and a train step or a decoding row fails to compile with
it (a refusal at trace time already falls back inside the model), that step is measured
with XLA's attention and the cuDNN failure recorded beside it. Any other failure is
recorded with its exception text (per row where rows are independent) and the run goes on.
Rows and sections that would start after --budget_s seconds are skipped and recorded as
such, so a run takes about the budget plus its last row's time; the JSON file is rewritten
after each section.
"""

import contextlib
import dataclasses
import gc
import json
import logging as py_logging
import math
import os
import pathlib
import statistics
import time
import traceback
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging

from sdiff_jax import config_lib, sampling, sharding, train
from sdiff_jax.bench import compiled as compiled_lib
from sdiff_jax.bench import roofline
from sdiff_jax.data import tokenizer as tokenizer_lib
from sdiff_jax.models import ATTENTION_MODES, ModelConfig, Transformer, training_mask
from sdiff_jax.models.transformer import ATTENTION_IMPLS

_TINY = flags.DEFINE_bool("tiny", False, "configs/tiny.py's shape, short runs (a CPU, seconds).")
_JSON = flags.DEFINE_string("json", None, "Write the device, the sections and wall time here.")
_BUDGET_S = flags.DEFINE_float("budget_s", 420.0, "Rows and sections starting later are skipped.")
_TRAIN_BATCHES = flags.DEFINE_list(
  "train_batches", None, "Per-device batches to try, descending (default: the scale's)."
)

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
GIB = 2**30
CUDNN_KERNEL = "__cudnn$fmha"  # custom-call target prefix of cuDNN's fused attention


@dataclasses.dataclass(frozen=True)
class Scale:
  """What the sections run: shapes from `config`, lengths and counts from here."""

  config: str  # a file in configs/, `name.py[:arg]`
  attention_layers: int  # depth of the attention section's model
  attention_chunk: int  # queries per chunk of its "chunked" rows
  attention_batch: int
  train_batches: tuple[int, ...]  # per-device batches to try, descending
  timed_steps: int  # after one untimed step
  decode_batches: tuple[int, ...]
  prompt_len: int
  gen_len: int
  block_size: int
  steps_per_block: tuple[int, ...]
  decode_repeats: int  # timed generations per row after one untimed
  copy_bytes: int  # array size of the copy-bandwidth measurement


FULL = Scale(
  config="1b.py:gpu8",
  attention_layers=2,
  attention_chunk=512,
  attention_batch=2,
  train_batches=(64, 48, 32, 24, 16, 8, 4, 2, 1),
  timed_steps=4,
  decode_batches=(1, 32),
  prompt_len=256,
  gen_len=256,
  block_size=32,
  steps_per_block=(1, 4, 8),
  decode_repeats=3,
  copy_bytes=GIB,
)
TINY = Scale(
  config="tiny.py",
  attention_layers=2,
  attention_chunk=16,
  attention_batch=2,
  train_batches=(8, 4),
  timed_steps=3,
  decode_batches=(1, 2),
  prompt_len=16,
  gen_len=32,
  block_size=8,
  steps_per_block=(1, 4),
  decode_repeats=2,
  copy_bytes=64 * 2**20,
)


@dataclasses.dataclass
class Clock:
  """Wall time since the run started, against the budget."""

  budget_s: float
  start: float = dataclasses.field(default_factory=time.perf_counter)

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def over(self) -> bool:
    return self.elapsed() > self.budget_s


class OverBudget(Exception):
  """A section stops early: the run's time is spent."""


def _failure(e: BaseException) -> dict[str, str]:
  logging.warning("failed: %s", e, exc_info=True)
  return {"error": f"{type(e).__name__}: {e}"[:4000], "traceback": traceback.format_exc()[-4000:]}


def _is_oom(e: BaseException) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


class _Collector(py_logging.Handler):
  def __init__(self):
    super().__init__(py_logging.WARNING)
    self.messages: list[str] = []

  def emit(self, record: py_logging.LogRecord) -> None:
    self.messages.append(record.getMessage())


@contextlib.contextmanager
def logged_warnings():
  """The absl warnings logged inside the block (e.g. the model's cuDNN fallback)."""
  collector = _Collector()
  logger = logging.get_absl_logger()
  logger.addHandler(collector)
  try:
    yield collector.messages
  finally:
    logger.removeHandler(collector)


def run_rows(record: dict, specs: list[dict], measure: Callable[..., dict], clock: Clock) -> None:
  """Appends a row per spec: the spec and `measure(**spec)`'s fields, the row's own
  failure, or "skipped" once the budget is spent."""
  for spec in specs:
    row = dict(spec)
    if clock.over():
      row["status"] = "skipped"
    else:
      try:
        row.update(measure(**spec), status="ok")
      except Exception as e:  # one row's failure is that row's result
        row.update(status="error", **_failure(e))
    record["rows"].append(row)


def _memory_stat(name: str) -> int | None:
  """The first device's allocator statistic (None on backends without one, e.g. CPU)."""
  return (jax.devices()[0].memory_stats() or {}).get(name)


def _vocab(config: ml_collections.ConfigDict) -> int:
  byte = config.data.tokenizer == "byte"
  return tokenizer_lib.BYTE_VOCAB_SIZE if byte else config.data.vocab_size


def _random_init(cfg: ModelConfig) -> Any:
  """Parameters of `cfg`'s shape (initialised through XLA's attention: no kernel to compile)."""
  model = Transformer(dataclasses.replace(cfg, attention_impl="xla"))
  tokens = jnp.zeros((1, 8), jnp.int32)
  init = lambda k: nn.meta.unbox(model.init(k, tokens, tokens, jnp.ones((1, 8, 8), bool))["params"])
  return jax.jit(init)(jax.random.key(0))


def _max_abs(tree: Any) -> float:
  return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- attention


def attention_inputs(
  mode: str, batch: int, seq_len: int, vocab: int, block_size: int, rng: np.random.Generator
) -> tuple[jax.Array, ...]:
  """(tokens, positions, mask, targets) of a training forward of `mode`: each row packs two
  documents (segments 1 and 2, positions restart) split off the block grid; half the
  tokens are MASK (causal: none); block_causal runs on [x_t ; x_0]."""
  tokens_BxL = rng.integers(tokenizer_lib.NUM_SPECIAL, vocab, (batch, seq_len), dtype=np.int32)
  idx_L = np.arange(seq_len, dtype=np.int32)
  split_Bx1 = 1 + (np.arange(1, batch + 1)[:, None] * seq_len) // (batch + 1)
  seg_BxL = np.where(idx_L < split_Bx1, 1, 2).astype(np.int32)
  pos_BxL = np.where(idx_L < split_Bx1, idx_L, idx_L - split_Bx1).astype(np.int32)
  masked_BxL = rng.random((batch, seq_len)) < (0.0 if mode == "causal" else 0.5)
  inputs_BxL = np.where(masked_BxL, tokenizer_lib.MASK_ID, tokens_BxL).astype(np.int32)
  mask = training_mask(mode, jnp.asarray(seg_BxL), block_size)
  if mode == "block_causal":
    inputs_BxL = np.concatenate([inputs_BxL, tokens_BxL], axis=1)
    pos_BxL = np.concatenate([pos_BxL, pos_BxL], axis=1)
  return jnp.asarray(inputs_BxL), jnp.asarray(pos_BxL), mask, jnp.asarray(tokens_BxL)


def forward_backward(cfg: ModelConfig, params: Any, inputs: tuple[jax.Array, ...]) -> dict:
  """Logits and parameter gradients of a cross-entropy on the first L outputs, from one
  compiled step; whether its HLO holds cuDNN's fused attention; compile seconds."""
  model = Transformer(cfg)

  def loss_fn(params, tokens_BxT, positions_BxT, mask_BxTxT, targets_BxL):
    logits_BxTxV, _ = model.apply({"params": params}, tokens_BxT, positions_BxT, mask_BxTxT)
    logp_BxLxV = jax.nn.log_softmax(logits_BxTxV[:, : targets_BxL.shape[1]])
    nll_BxL = -jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    return jnp.mean(nll_BxL), logits_BxTxV

  start = time.perf_counter()
  step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True)).lower(params, *inputs).compile()
  compile_s = time.perf_counter() - start
  (_, logits), grads = step(params, *inputs)
  return {
    "logits": logits,
    "grads": grads,
    "cudnn_kernel": CUDNN_KERNEL in step.as_text(),
    "compile_s": compile_s,
  }


def attention_section(
  record: dict, config: ml_collections.ConfigDict, scale: Scale, clock: Clock
) -> None:
  base = dataclasses.replace(
    config_lib.model_config(config, _vocab(config)),
    n_layers=scale.attention_layers,
    attention_chunk=scale.attention_chunk,
    remat=False,
  )
  seq_len, block_size = config.data.seq_len, config.diffusion.block_size
  record.update(
    model={f: getattr(base, f) for f in ("d_model", "n_layers", "n_heads", "n_kv_heads")},
    head_dim=base.head_dim,
    seq_len=seq_len,
    batch=scale.attention_batch,
    attention_chunk=base.attention_chunk,
    reference="xla",
    note="max |impl - xla| of the logits (block_causal: over [x_t ; x_0]) and of all "
    "parameter gradients; *_ref_max_abs: the largest |value| of the reference",
  )
  rng = np.random.default_rng(0)
  inputs = {
    mode: attention_inputs(mode, scale.attention_batch, seq_len, base.vocab_size, block_size, rng)
    for mode in ATTENTION_MODES
  }
  params = _random_init(base)
  references: dict[tuple[str, str], dict] = {}

  def measure(mask: str, impl: str, dtype: str) -> dict:
    if (mask, dtype) not in references:
      cfg = dataclasses.replace(base, dtype=dtype, attention_impl="xla")
      references[mask, dtype] = forward_backward(cfg, params, inputs[mask])
    ref = references[mask, dtype]
    with logged_warnings() as warnings:
      cfg = dataclasses.replace(base, dtype=dtype, attention_impl=impl)
      out = forward_backward(cfg, params, inputs[mask])
    grad_diffs = jax.tree.map(jnp.subtract, out["grads"], ref["grads"])
    return {
      "logits_max_abs_diff": _max_abs(out["logits"] - ref["logits"]),
      "logits_ref_max_abs": _max_abs(ref["logits"]),
      "grads_max_abs_diff": _max_abs(grad_diffs),
      "grads_ref_max_abs": _max_abs(ref["grads"]),
      "cudnn_kernel": out["cudnn_kernel"],
      "warnings": warnings,
      "compile_s": out["compile_s"],
    }

  gpu = jax.default_backend() == "gpu"
  impls = [i for i in ATTENTION_IMPLS if i not in ("", "xla") and (gpu or i != "cudnn")]
  specs = [dict(mask=m, impl=i, dtype=base.dtype) for m in ATTENTION_MODES for i in impls]
  # cuDNN refuses float32 (and a CPU refuses cudnn altogether): the model's fallback to XLA
  specs.append(dict(mask="bidirectional", impl="cudnn", dtype="float32"))
  run_rows(record, specs, measure, clock)


# ----------------------------------------------------------------------------- training


def random_rows(rows: int, seq_len: int, vocab: int, rng: np.random.Generator) -> dict:
  """A training batch of one document per row: tokens in [NUM_SPECIAL, vocab)."""
  return {
    "tokens": rng.integers(tokenizer_lib.NUM_SPECIAL, vocab, (rows, seq_len), dtype=np.int32),
    "segment_ids": np.ones((rows, seq_len), np.int32),
    "positions": np.tile(np.arange(seq_len, dtype=np.int32), (rows, 1)),
  }


def _time_steps(compiled, state: train.TrainState, batch: dict, steps: int):
  """(median seconds of `steps` steps after one untimed, the state, the last loss)."""
  key = jax.random.key(1)
  state, metrics = jax.block_until_ready(compiled(state, batch, key))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(compiled(state, batch, key))
    times.append(time.perf_counter() - start)
  return statistics.median(times), state, float(metrics["loss"])


def run_stage(
  setup: train.TrainSetup,
  batch: dict,
  stage: str,
  steps: int,
  limit: int | None,
  state: train.TrainState | None = None,
) -> tuple[dict, train.TrainState | None]:
  """Compiles `stage`'s train step and, unless its memory analysis puts it over `limit`,
  times it (from `state`, or a fresh one): (the measurements, the state or None)."""
  start = time.perf_counter()
  lowered = train.make_train_step(setup).lower(
    setup.abstract_state, batch, jax.random.key(0), stage=stage
  )
  compiled = lowered.compile()
  result = {
    "compile_s": time.perf_counter() - start,
    "compiled_memory": roofline.compiled_memory(compiled),
    "cudnn_kernel": CUDNN_KERNEL in compiled.as_text(),
  }
  if limit is not None and result["compiled_memory"]["peak"] > limit:
    return result, None
  state = setup.init_state(jax.random.key(0)) if state is None else state
  step_s, state, loss = _time_steps(compiled, state, batch, steps)
  return {**result, "step_s": step_s, "loss": loss}, state


def _surely_over(over: tuple[int, dict] | None, batch: int, seq_len: int, limit) -> bool:
  """Whether `batch` cannot fit, given the smallest batch B whose compiled step XLA put
  over the limit: for b <= B its peak is at least peak(B) - temp(B) - B's token arrays +
  temp(B) * b / B (temporaries affine in the batch, from a non-negative base)."""
  if over is None or limit is None:
    return False
  b_over, memory = over
  rows_bytes = 3 * 4 * b_over * seq_len  # tokens, segment_ids, positions: int32
  fixed = memory["peak"] - memory["temp"] - rows_bytes
  return batch <= b_over and fixed + memory["temp"] * batch / b_over > limit


def training_section(
  record: dict,
  config: ml_collections.ConfigDict,
  scale: Scale,
  batches: tuple[int, ...],
  clock: Clock,
) -> None:
  config = config.copy_and_resolve_references()
  config.train.grad_accum_steps = 1
  config.mesh.update(dict(data=1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  vocab, seq_len = _vocab(config), config.data.seq_len
  device = jax.devices()[0]
  limit = _memory_stat("bytes_limit")
  record.update(
    config=scale.config,
    seq_len=seq_len,
    dtype=config.model.dtype,
    remat=config.model.remat,
    attention=config.attention,
    attention_impl=config.model.attention_impl,
    params=config_lib.model_config(config, vocab).num_params(),
    device_bytes_limit=limit,
    mem_fraction_env=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
    note="one device, grad_accum_steps=1: the batch is the per-device micro-batch; random "
    "token rows, one document each; the batch is searched in stage mask+edit (two forwards); "
    "device_peak_bytes_in_use: the allocator's peak in this process so far",
    batch_search=[],
  )
  rng = np.random.default_rng(0)
  over, found, remaining = None, None, list(batches)
  while remaining and found is None:
    b = remaining[0]
    attempt = {"batch": b, "attention_impl": config.model.attention_impl}
    record["batch_search"].append(attempt)
    if clock.over():
      attempt.update(fits=None, why="skipped: over budget")
      raise OverBudget(f"during the batch search, before batch {b}")
    if _surely_over(over, b, seq_len, limit):
      attempt.update(fits=False, why=f"batch {over[0]}'s compiled peak implies more than the limit")
      remaining.pop(0)
      continue
    config.train.batch_size = b
    setup = train.TrainSetup.create(config, vocab, mesh)
    batch = sharding.global_batch(random_rows(b, seq_len, vocab, rng), mesh)
    try:
      result, state = run_stage(setup, batch, "mask+edit", scale.timed_steps, limit)
    except Exception as e:  # out of memory: a smaller batch; cuDNN failing: XLA's attention
      if not _is_oom(e) and config.model.attention_impl != "cudnn":
        raise
      attempt.update(fits=False if _is_oom(e) else None, why=f"{type(e).__name__}: {e}"[:1000])
      if _is_oom(e):
        remaining.pop(0)
      else:  # the same batch again: the step must be measured, if not with cuDNN's kernel
        record.update(cudnn_failure=_failure(e), attention_impl="xla")
        config.model.attention_impl = "xla"
      continue
    remaining.pop(0)
    attempt.update(fits=state is not None, compile_s=result["compile_s"])
    attempt["compiled_peak"] = result["compiled_memory"]["peak"]
    if state is None:
      attempt["why"] = "compiled peak over the device's limit"
      over = (b, result["compiled_memory"])
      continue
    found = (b, setup, batch, {"mask+edit": result}, state)
  if found is None:
    raise RuntimeError(f"no per-device batch of {batches} fits")
  b, setup, batch, stages, state = found
  stages["mask"], _ = run_stage(setup, batch, "mask", scale.timed_steps, None, state)
  peak = roofline.peak_flops(device.device_kind)
  record["peak_flops"] = peak
  if peak is None:
    record["mfu_note"] = f"no peak FLOP/s for {device.device_kind!r} in roofline.PEAK_BF16_FLOPS"
  for stage in ("mask", "mask+edit"):
    flops = roofline.train_flops_per_token(
      setup.objective.model_cfg,
      seq_len,
      forwards=2 if stage == "mask+edit" else 1,
      length_factor=setup.objective.input_length_factor,
    )
    tokens_per_s = b * seq_len / stages[stage]["step_s"]
    achieved = flops["flops_per_token"] * tokens_per_s
    record["rows"].append(
      {
        "stage": stage,
        "batch": b,
        "tokens_per_s": tokens_per_s,
        **flops,
        "achieved_flops_per_s": achieved,
        "mfu": achieved / peak if peak else None,
        **stages[stage],
        "status": "ok",
      }
    )
  record["device_peak_bytes_in_use"] = _memory_stat("peak_bytes_in_use")
  if clock.over():
    record["step_memory_estimate"] = {"status": "skipped"}
    return
  estimate_config = config.copy_and_resolve_references()
  estimate_config.data.vocab_size = vocab  # step_memory's vocabulary (byte tokenizer: 260)
  try:
    record["step_memory_estimate"] = {
      "status": "ok",
      "note": "bench.compiled.step_memory (stage mask+edit; cudnn replaced by the chunked "
      f"attention), compiled for {jax.default_backend()}",
      **compiled_lib.step_memory(estimate_config),
    }
  except Exception as e:  # the estimate's failure is recorded, not the section's
    record["step_memory_estimate"] = {"status": "error", **_failure(e)}


# ----------------------------------------------------------------------------- decoding


def time_generation(
  decoder: sampling.Decoder,
  params: Any,
  settings: sampling.Settings,
  prompt_BxP: np.ndarray,
  repeats: int,
) -> dict:
  """Compiles one generation of full-length prompts, then times `repeats` calls after an
  untimed one: median seconds, NFE, shortest generation, compile seconds, cuDNN kernel."""
  lens_B = np.full((prompt_BxP.shape[0],), prompt_BxP.shape[1], np.int32)
  key = jax.random.key(0)
  start = time.perf_counter()
  generate = sampling.compile_generate(decoder, params, prompt_BxP, lens_B, key, settings)
  compile_s = time.perf_counter() - start
  gen = jax.block_until_ready(generate(params, prompt_BxP, lens_B, key))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    gen = jax.block_until_ready(generate(params, prompt_BxP, lens_B, key))
    times.append(time.perf_counter() - start)
  return {
    "median_s": statistics.median(times),
    "nfe": int(gen.nfe),
    "generated_tokens": int(np.min(jax.device_get(gen.lengths))),
    "compile_s": compile_s,
    "cudnn_kernel": CUDNN_KERNEL in generate.as_text(),
  }


def decoding_section(
  record: dict, config: ml_collections.ConfigDict, scale: Scale, clock: Clock
) -> None:
  cfg = config_lib.model_config(config, _vocab(config))
  decoder = sampling.Decoder(cfg)
  # Prepared once (per-layer, decoding dtype): every generation then reads these bytes.
  params = jax.jit(decoder.prepare)(_random_init(cfg))
  bandwidth = roofline.copy_bandwidth(scale.copy_bytes)
  weights = roofline.weight_bytes(params, cfg)
  attention = config.attention
  record.update(
    config=scale.config,
    params=cfg.num_params(),
    dtype=cfg.dtype,
    attention=attention,
    prompt_len=scale.prompt_len,
    gen_len=scale.gen_len,
    block_size=scale.block_size,
    copy_bytes=scale.copy_bytes,
    copy_bandwidth_bytes_per_s=bandwidth,
    weight_bytes=weights,
    bytes_formula=roofline.decode_bytes_per_forward(cfg, weights, 1, 0, 0)["formula"],
    note="roofline_ms_per_forward = bytes_per_forward / copy bandwidth; roofline_fraction = "
    "roofline_ms_per_forward / ms_per_forward (measured: median time / NFE); EOS suppressed",
  )
  rng = np.random.default_rng(0)

  def measure(batch: int, mode: str, steps_per_block: int | None) -> dict:
    block = mode == "block"
    settings = sampling.Settings(
      attention=attention if block else "causal",
      max_new_tokens=scale.gen_len,
      suppress_eos=True,
      shift=bool(config.diffusion.shift) and block,
      **(dict(block_size=scale.block_size, steps_per_block=steps_per_block) if block else {}),
    )
    prompt_BxP = rng.integers(
      tokenizer_lib.NUM_SPECIAL, cfg.vocab_size, (batch, scale.prompt_len), dtype=np.int32
    )
    prompt_BxP[:, 0] = tokenizer_lib.BOS_ID
    row = {"attention_impl": cfg.attention_impl or "xla"}
    try:
      row.update(time_generation(decoder, params, settings, prompt_BxP, scale.decode_repeats))
    except Exception as e:  # cuDNN failing to compile these shapes: measure XLA's attention
      if cfg.attention_impl != "cudnn" or _is_oom(e):
        raise
      xla = sampling.Decoder(dataclasses.replace(cfg, attention_impl="xla"))
      row.update(attention_impl="xla", cudnn_failure=_failure(e)["error"])
      row.update(time_generation(xla, params, settings, prompt_BxP, scale.decode_repeats))
    read = roofline.decode_bytes_per_forward(cfg, weights, batch, scale.prompt_len, scale.gen_len)
    ms_per_forward = 1e3 * row["median_s"] / row["nfe"]
    roofline_ms = 1e3 * read["bytes_per_forward"] / bandwidth
    return {
      "block_size": scale.block_size if block else None,
      "blocks": math.ceil(scale.gen_len / scale.block_size) if block else None,
      **row,
      "tokens_per_s": batch * scale.gen_len / row["median_s"],
      "ms_per_forward": ms_per_forward,
      "kv_bytes": read["kv_bytes"],
      "bytes_per_forward": read["bytes_per_forward"],
      "roofline_ms_per_forward": roofline_ms,
      "roofline_fraction": roofline_ms / ms_per_forward,
    }

  specs = [
    dict(batch=b, mode=mode, steps_per_block=s)
    for b in scale.decode_batches
    for mode, s in [("ar", None)] + [("block", s) for s in scale.steps_per_block]
  ]
  run_rows(record, specs, measure, clock)


# ----------------------------------------------------------------------------- output

_COLUMNS = {  # section -> (header, key, format)
  "attention": (
    ("mask", "mask", "{}"),
    ("impl", "impl", "{}"),
    ("dtype", "dtype", "{}"),
    ("logits max diff", "logits_max_abs_diff", "{:.2e}"),
    ("logits max", "logits_ref_max_abs", "{:.2f}"),
    ("grads max diff", "grads_max_abs_diff", "{:.2e}"),
    ("grads max", "grads_ref_max_abs", "{:.2e}"),
    ("cuDNN kernel", "cudnn_kernel", "{}"),
    ("warnings", "warnings", "{}"),
    ("compile s", "compile_s", "{:.1f}"),
    ("status", "status", "{}"),
  ),
  "training": (
    ("stage", "stage", "{}"),
    ("batch", "batch", "{}"),
    ("step s", "step_s", "{:.3f}"),
    ("tokens/s", "tokens_per_s", "{:,.0f}"),
    ("FLOPs/token", "flops_per_token", "{:.3e}"),
    ("MFU", "mfu", "{:.1%}"),
    ("loss", "loss", "{:.3f}"),
    ("cuDNN kernel", "cudnn_kernel", "{}"),
    ("compile s", "compile_s", "{:.1f}"),
    ("status", "status", "{}"),
  ),
  "decoding": (
    ("batch", "batch", "{}"),
    ("mode", "mode", "{}"),
    ("steps/block", "steps_per_block", "{}"),
    ("impl", "attention_impl", "{}"),
    ("NFE", "nfe", "{}"),
    ("tokens/s", "tokens_per_s", "{:,.1f}"),
    ("ms/forward", "ms_per_forward", "{:.3f}"),
    ("MB/forward", "bytes_per_forward", "{:.1f}"),
    ("roofline ms", "roofline_ms_per_forward", "{:.3f}"),
    ("roofline", "roofline_fraction", "{:.1%}"),
    ("cuDNN kernel", "cudnn_kernel", "{}"),
    ("compile s", "compile_s", "{:.1f}"),
    ("status", "status", "{}"),
  ),
}


def markdown(name: str, record: dict) -> str:
  """The section's rows as a markdown table, with its status and (training) memory lines."""
  columns = _COLUMNS[name]
  lines = [f"\n## {name}: {record['status']} ({record['wall_s']:.1f} s)"]
  if record.get("error") or record.get("why"):
    lines.append(f"{record.get('error') or record.get('why')}")
  lines.append("| " + " | ".join(c[0] for c in columns) + " |")
  lines.append("|" + "---|" * len(columns))
  for row in record["rows"]:
    row = dict(row)
    if row.get("bytes_per_forward") is not None:
      row["bytes_per_forward"] /= 1e6
    if row.get("warnings") is not None:
      row["warnings"] = len(row["warnings"])
    cells = ["-" if row.get(k) is None else fmt.format(row[k]) for _, k, fmt in columns]
    lines.append("| " + " | ".join(cells).replace("\n", " ") + " |")
    for failure in ("error", "cudnn_failure"):
      if row.get(failure):
        lines.append(f"  {failure}: {row[failure][:300]}")
  for attempt in record.get("batch_search", []):
    lines.append(f"batch {attempt['batch']}: fits={attempt.get('fits')} {attempt.get('why', '')}")
  for row in record["rows"]:
    if "compiled_memory" in row:
      lines.append(f"{row['stage']}: compiled peak {row['compiled_memory']['peak'] / GIB:.2f} GiB")
  estimate = record.get("step_memory_estimate", {})
  if estimate.get("status") == "ok":
    lines.append(f"step_memory estimate (chunked attention): {estimate['peak'] / GIB:.2f} GiB")
  return "\n".join(lines)


def run_section(fn: Callable[[dict], None], clock: Clock) -> dict:
  """`fn(record)` fills the record's rows; its failure (or the budget) is the status."""
  record: dict[str, Any] = {"rows": []}
  start = time.perf_counter()
  if clock.over():
    record["status"] = "skipped"
  else:
    try:
      fn(record)
      record["status"] = "ok"
    except OverBudget as e:
      record.update(status="skipped", why=f"over budget {e}")
    except Exception as e:  # a section's failure is recorded, the run goes on
      record.update(status="error", **_failure(e))
  record["wall_s"] = time.perf_counter() - start
  jax.clear_caches()
  gc.collect()
  return record


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  clock = Clock(_BUDGET_S.value)
  gpu = jax.default_backend() == "gpu"
  scale = TINY if _TINY.value else FULL if gpu else dataclasses.replace(FULL, config="1b.py:cpu")
  config = config_lib.from_file(str(CONFIGS / scale.config))
  batches = tuple(map(int, _TRAIN_BATCHES.value or scale.train_batches))
  device = jax.devices()[0]
  result = {
    "device_kind": device.device_kind,
    "platform": device.platform,
    "devices": jax.device_count(),
    "jax": jax.__version__,
    "tiny": _TINY.value,
    "config": scale.config,
    "budget_s": clock.budget_s,
    "sections": {},
  }
  sections = {
    "attention": lambda r: attention_section(r, config, scale, clock),
    "training": lambda r: training_section(r, config, scale, batches, clock),
    "decoding": lambda r: decoding_section(r, config, scale, clock),
  }
  print(f"{device.device_kind} ({device.platform}), jax {jax.__version__}, {scale.config}")
  for name, fn in sections.items():
    result["sections"][name] = run_section(fn, clock)
    result["wall_s"] = clock.elapsed()
    print(markdown(name, result["sections"][name]), flush=True)
    if _JSON.value:  # after every section: a run killed later keeps what it measured
      with open(_JSON.value, "w") as f:
        json.dump(result, f, indent=1)
  print(f"\nwall time {result['wall_s']:.1f} s (budget {clock.budget_s:.0f} s)")


def run():
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
