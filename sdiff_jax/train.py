"""Training: state init on the mesh, jitted train/eval steps, the resumable loop.

Objectives by `config.model.attention`:
* `bidirectional` / `block_causal`: masked-diffusion ELBO; from
  `curriculum.edit_start_fraction` of the steps on, plus the edit term
  -log p(x0 | x_edit) (the two-stage curriculum). The stage is a static
  argument of the step, so each stage compiles once.
* `causal`: next-token loss (the autoregressive baseline).
"""

import dataclasses
import functools
import json
import os
import signal
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from sdiff_jax import config_lib, corruption, losses, schedules, sharding
from sdiff_jax.data import pipeline, sources, tokenizer as tokenizer_lib
from sdiff_jax.metric_writer import MetricWriter, format_duration
from sdiff_jax.models import Transformer, training_mask

Batch = dict[str, jax.Array]  # tokens, segment_ids, positions: int32[B, L]


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32[]
  params: Any
  opt_state: Any
  first_nonfinite_step: jax.Array  # int32[]; -1 while every loss has been finite


# ----------------------------------------------------------------------------- model + loss


class Objective:
  """The loss of one config, as a pure function of (params, batch, key)."""

  def __init__(self, config: ml_collections.ConfigDict, vocab_size: int):
    self.config = config
    self.model_cfg = config_lib.model_config(config, vocab_size)
    self.model = Transformer(self.model_cfg)
    self.mode = config.model.attention
    self.gamma = schedules.get_gamma_schedule(config.diffusion.gamma_schedule)
    self.alpha = schedules.get_alpha_schedule(config.diffusion.alpha_schedule,
                                              config.diffusion.alpha_max)

  def logits(self, params, inputs_BxL: jax.Array, batch: Batch) -> jax.Array:
    """Denoiser logits for `inputs` at the positions of the clean `batch`."""
    seg_BxL, pos_BxL = batch["segment_ids"], batch["positions"]
    if self.mode == "block_causal":
      length = inputs_BxL.shape[1]
      tokens_Bx2L = jnp.concatenate([inputs_BxL, batch["tokens"]], axis=1)
      pos_Bx2L = jnp.concatenate([pos_BxL, pos_BxL], axis=1)
      mask = training_mask(self.mode, seg_BxL, self.config.model.block_size)
      logits, _ = self.model.apply({"params": params}, tokens_Bx2L, pos_Bx2L, mask)
      return logits[:, :length]
    mask = training_mask(self.mode, seg_BxL, self.config.model.block_size)
    logits, _ = self.model.apply({"params": params}, inputs_BxL, pos_BxL, mask)
    return logits

  def __call__(self, params, batch: Batch, key: jax.Array, with_edit: bool
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    tokens_BxL, seg_BxL = batch["tokens"], batch["segment_ids"]
    valid_BxL = seg_BxL > 0
    metrics = {"valid_tokens": valid_BxL.sum().astype(jnp.float32)}
    if self.mode == "causal":
      targets_BxL, target_valid_BxL = losses.next_token_targets(tokens_BxL, seg_BxL)
      nll_BxL = losses.token_nll(self.logits(params, tokens_BxL, batch), targets_BxL,
                                 tokenizer_lib.MASK_ID)
      loss = losses.mean_bits(nll_BxL, target_valid_BxL)
      return loss, {**metrics, "loss": loss, "ar_bits": loss}

    time_key, mask_key, edit_time_key, edit_key = jax.random.split(key, 4)
    d = self.config.diffusion
    t_B = schedules.sample_times(time_key, tokens_BxL.shape[0], eps=d.time_eps,
                                 antithetic=d.antithetic)
    noisy_BxL, is_masked_BxL = corruption.mask_corrupt(
        mask_key, tokens_BxL, self.gamma.gamma(t_B), valid_BxL, mask_id=tokenizer_lib.MASK_ID)
    nll_BxL = losses.token_nll(self.logits(params, noisy_BxL, batch), tokens_BxL,
                               tokenizer_lib.MASK_ID)
    mask_bits = losses.masked_diffusion_bits(
        nll_BxL, is_masked_BxL, schedules.elbo_weight(self.gamma, t_B), valid_BxL)
    metrics.update(mask_bits=mask_bits, mask_rate=is_masked_BxL.sum() / jnp.maximum(valid_BxL.sum(), 1))
    loss = mask_bits
    if with_edit:
      # A packed row is edited as one sequence of its real tokens; the model
      # sees the edited row at the clean row's positions and segments and must
      # restore x0 at every position (no carry-over).
      s_B = schedules.sample_times(edit_time_key, tokens_BxL.shape[0], eps=d.time_eps,
                                   antithetic=d.antithetic)
      edited = corruption.edit_corrupt_batch(
          edit_key, tokens_BxL, valid_BxL.sum(axis=1), self.alpha.alpha(s_B),
          vocab_size=self.model_cfg.vocab_size, alpha_max=d.alpha_max,
          op_probs=tuple(d.edit_op_probs), num_special=tokenizer_lib.NUM_SPECIAL,
          pad_id=tokenizer_lib.PAD_ID)
      edit_nll_BxL = losses.token_nll(self.logits(params, edited.tokens, batch), tokens_BxL,
                                      tokenizer_lib.MASK_ID)
      edit_bits = losses.mean_bits(edit_nll_BxL, valid_BxL)
      loss = loss + self.config.curriculum.edit_weight * edit_bits
      metrics["edit_bits"] = edit_bits
    metrics["loss"] = loss
    return loss, metrics


def lr_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine decay to `end_lr_fraction` of it."""
  t = config.train
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=t.warmup_steps,
      decay_steps=max(t.num_steps, t.warmup_steps + 1), end_value=t.learning_rate * t.end_lr_fraction)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  t = config.train
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip),
      optax.adamw(lr_schedule(config), b1=0.9, b2=t.b2, weight_decay=t.weight_decay,
                  mask=decay_mask))


# ----------------------------------------------------------------------------- state + steps


def _state_init_fn(objective: Objective, tx: optax.GradientTransformation, seq_len: int):
  length = 2 * seq_len if objective.mode == "block_causal" else seq_len

  def init(key):
    tokens = jnp.zeros((1, length), jnp.int32)
    mask = jnp.ones((1, length, length), bool)
    params = objective.model.init(key, tokens, tokens, mask)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      first_nonfinite_step=jnp.full((), -1, jnp.int32))

  return init


def abstract_train_state(objective: Objective, tx: optax.GradientTransformation, mesh,
                         axis_rules, seq_len: int) -> tuple[TrainState, Any]:
  """(ShapeDtypeStructs carrying their shardings, shardings) of the state; nothing allocated."""
  boxed = jax.eval_shape(_state_init_fn(objective, tx, seq_len), jax.random.key(0))
  shardings = sharding.logical_shardings(boxed, mesh, axis_rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.meta.unbox(boxed), shardings)
  return abstract, shardings


def init_train_state(objective: Objective, tx: optax.GradientTransformation, mesh,
                     axis_rules, key: jax.Array, seq_len: int) -> tuple[TrainState, Any]:
  """Initialises the state directly sharded: eval_shape -> shardings -> jit(init)."""
  _, shardings = abstract_train_state(objective, tx, mesh, axis_rules, seq_len)
  init = _state_init_fn(objective, tx, seq_len)
  state = jax.jit(lambda k: nn.meta.unbox(init(k)), out_shardings=shardings)(key)
  return state, shardings


def make_train_step(objective: Objective, tx: optax.GradientTransformation, state_shardings,
                    mesh, grad_accum_steps: int) -> Callable[..., tuple[TrainState, dict]]:
  """jit(train_step) with shardings and donation; `with_edit` is static."""

  def grads_of(params, batch, key, with_edit):
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if grad_accum_steps == 1:
      (_, metrics), grads = grad_fn(params, batch, key, with_edit)
      return grads, metrics
    # Micro-batch i takes rows i, i + n, i + 2n, ... (n = grad_accum_steps): every
    # device keeps its own rows, so the split moves no data and each micro-batch
    # stays sharded over (data, fsdp). A (n, B/n) split would put the sharding on
    # the scan axis and hand every device whole micro-batches.
    split = lambda x: jax.lax.with_sharding_constraint(
        jnp.swapaxes(x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:]), 0, 1),
        NamedSharding(mesh, P(None, *sharding.batch_sharding(mesh).spec)))
    micro = jax.tree.map(split, batch)

    def one(micro_batch, key):
      micro_batch = jax.lax.with_sharding_constraint(micro_batch, sharding.batch_sharding(mesh))
      (_, metrics), grads = grad_fn(params, micro_batch, key, with_edit)
      return grads, metrics

    shapes = jax.eval_shape(one, jax.tree.map(lambda x: x[0], micro), key)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(acc, xs):
      micro_batch, i = xs
      return jax.tree.map(jnp.add, acc, one(micro_batch, jax.random.fold_in(key, i))), None

    (grads, metrics), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(grad_accum_steps)))
    scale = lambda x: x / grad_accum_steps
    metrics = {k: v if k == "valid_tokens" else scale(v) for k, v in metrics.items()}
    return jax.tree.map(scale, grads), metrics

  def train_step(state: TrainState, batch: Batch, key: jax.Array, with_edit: bool):
    rows, shards = batch["tokens"].shape[0], mesh.shape["data"] * mesh.shape["fsdp"]
    if (rows // grad_accum_steps) % shards:
      raise ValueError(
          f"a micro-batch of {rows} rows / {grad_accum_steps} accumulation steps does not "
          f"split over the {shards} (data x fsdp) devices: make train.batch_size / "
          f"train.grad_accum_steps a multiple of {shards}")
    key = jax.random.fold_in(key, state.step)
    grads, metrics = grads_of(state.params, batch, key, with_edit)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree_utils.tree_norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    first_bad = jnp.where((state.first_nonfinite_step < 0) & ~finite, state.step,
                          state.first_nonfinite_step)
    new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                           opt_state=keep(opt_state, state.opt_state),
                           first_nonfinite_step=first_bad)
    return new_state, {**metrics, "grad_norm": grad_norm}

  return _PerStage(train_step, mesh, sharding.rules(objective.config.mesh),
                   in_shardings=(state_shardings, sharding.batch_sharding(mesh),
                                             sharding.replicated(mesh)),
                   out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


class _PerStage:
  """One jit of `fn(..., with_edit)` per curriculum stage; call as f(*args, with_edit=...).

  Traced under `sharding.activation_rules`, so the model's activations keep their
  rows sharded over (data, fsdp) instead of whatever XLA's propagation picks.
  """

  def __init__(self, fn, mesh, axis_rules, **jit_kwargs):
    self._context = lambda: sharding.activation_rules(mesh, axis_rules)
    self._jitted = {w: jax.jit(functools.partial(fn, with_edit=w), **jit_kwargs)
                    for w in (False, True)}

  def __call__(self, *args, with_edit: bool):
    with self._context():
      return self._jitted[with_edit](*args)

  def lower(self, *args, with_edit: bool):
    """Lowers for abstract arguments (jax.ShapeDtypeStruct), e.g. to compile without data."""
    with self._context():
      return self._jitted[with_edit].lower(*args)


def make_eval_step(objective: Objective, mesh, params_shardings):
  """Validation metrics with the training objective (edit term included when asked)."""

  def eval_step(params, batch, key, with_edit):
    return objective(params, batch, key, with_edit)[1]

  return _PerStage(eval_step, mesh, sharding.rules(objective.config.mesh),
                   in_shardings=(params_shardings, sharding.batch_sharding(mesh),
                                            sharding.replicated(mesh)),
                   out_shardings=sharding.replicated(mesh))


def global_batch(batch: dict[str, np.ndarray], mesh) -> Batch:
  """Per-process numpy batch -> global jax arrays sharded over (data, fsdp)."""
  sh = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}


# ----------------------------------------------------------------------------- workdir + checkpoints


def prepare_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> tokenizer_lib.Tokenizer:
  """Loads the workdir's tokenizer, or trains/saves one on the training split."""
  d = config.data
  return tokenizer_lib.get_or_build_tokenizer(
      os.path.join(workdir, "tokenizer"), d.tokenizer, d.vocab_size,
      lambda: sources.load_corpus(d.source, "train", d.valid_fraction))


def chief_first(build: Callable[[], Any], what: str) -> Any:
  """`build()` on process 0, then on the others once it has finished: files it writes
  to the shared workdir (tokenizer, TFDS ArrayRecords) are written once, then loaded."""
  if jax.process_count() == 1:
    return build()
  from jax.experimental import multihost_utils
  result = build() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(f"sdiff_jax: process 0 prepared the {what}")
  return result if jax.process_index() == 0 else build()


def data_config_for(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict(config.data.to_dict())
  if not d.tfds_data_dir:
    d.tfds_data_dir = os.path.join(workdir, "tfds")
  return d


class CheckpointError(RuntimeError):
  """A checkpoint in the workdir could not be restored."""


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.train.keep_checkpoints, create=True, enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


def restore_checkpoint(mngr: ocp.CheckpointManager, step: int, abstract_state: TrainState):
  """Restores (state, data iterator state) of `step`; CheckpointError says what went wrong."""
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  except Exception as e:  # orbax raises many types for truncated / missing files
    others = [s for s in mngr.all_steps() if s != step]
    hint = (f"; earlier checkpoints {others} are untouched: move {mngr.directory / str(step)} "
            "aside to resume from the newest of them") if others else ""
    raise CheckpointError(
        f"checkpoint step {step} in {mngr.directory} could not be restored: "
        f"{type(e).__name__}: {str(e)[:300]}{hint}") from e
  return restored["state"], _this_process_data_state(restored["data"])


def _this_process_data_state(saved: dict) -> dict | None:
  """This process's iterator state from the per-process list a checkpoint holds;
  None (start the data afresh) when the checkpoint was written by another number
  of processes, whose shards of the data do not map onto this run's."""
  count, index = jax.process_count(), jax.process_index()
  if "per_process" not in saved:  # written before per-process states: one process's
    return saved
  if saved["process_count"] != count:
    logging.warning("checkpoint's data iterator states come from %d processes, this run has %d: "
                    "the data stream restarts (the model state is restored)",
                    saved["process_count"], count)
    return None
  return saved["per_process"][index]


def _gather_data_states(data_state: dict) -> list[dict]:
  """Every process's iterator state, in process order (a collective on all processes):
  each process reads its own shard of the data, so each has its own position."""
  if jax.process_count() == 1:
    return [data_state]
  from jax.experimental import multihost_utils
  raw_N = np.frombuffer(json.dumps(data_state).encode(), np.uint8)
  lengths_P = np.asarray(multihost_utils.process_allgather(np.int32(raw_N.size)))
  padded_N = np.zeros(int(lengths_P.max()), np.uint8)
  padded_N[:raw_N.size] = raw_N
  every_PxN = np.asarray(multihost_utils.process_allgather(padded_N))
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(every_PxN, lengths_P)]


def save_checkpoint(mngr: ocp.CheckpointManager, state: TrainState, data_state: dict,
                    force: bool = False) -> None:
  """Saves the state and every process's `data_state` (call on all processes)."""
  data = {"process_count": jax.process_count(), "per_process": _gather_data_states(data_state)}
  mngr.save(int(state.step), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)), force=force)


# ----------------------------------------------------------------------------- the loop


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step (`stop_now`)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def stop_now(self, sync_point: bool) -> bool:
    """Whether the loop saves and stops after this step. Several processes must agree
    (the save is collective): they compare flags at sync points, the logging steps,
    which every process reaches at the same step; a lone process stops at once."""
    if jax.process_count() == 1:
      return self.requested
    if not sync_point:
      return False
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.bool_(self.requested))))

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  metrics: dict[str, float]  # last evaluation
  preempted: bool
  workdir: str


def evaluate(eval_step, params, eval_ds, config, mesh, with_edit: bool) -> dict[str, float]:
  """Token-weighted mean of the validation metrics over the same `eval_batches` batches."""
  totals: dict[str, float] = {}
  weight = 0.0
  key = jax.random.key(config.seed + 1)
  for i, batch in zip(range(config.train.eval_batches), iter(eval_ds)):
    m = jax.device_get(eval_step(params, global_batch(batch, mesh), jax.random.fold_in(key, i),
                                 with_edit=with_edit))
    w = float(m.pop("valid_tokens"))
    weight += w
    for k, v in m.items():
      totals[k] = totals.get(k, 0.0) + w * float(v)
  return {f"eval_{k}": v / max(weight, 1.0) for k, v in totals.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
  """Trains `config` in `workdir`, resuming from its latest checkpoint."""
  config_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  is_chief = jax.process_index() == 0
  tok = chief_first(lambda: prepare_tokenizer(config, workdir), "tokenizer")
  if is_chief:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  mesh = sharding.make_mesh(config.mesh)
  axis_rules = sharding.rules(config.mesh)
  objective = Objective(config, tok.vocab_size)
  tx = make_optimizer(config)
  abstract_state, state_sh = abstract_train_state(objective, tx, mesh, axis_rules,
                                                  config.data.seq_len)
  train_step = make_train_step(objective, tx, state_sh, mesh, config.train.grad_accum_steps)
  eval_step = make_eval_step(objective, mesh, state_sh.params)

  data_config = data_config_for(config, workdir)
  per_process_batch = config.train.batch_size // jax.process_count()
  train_ds = chief_first(lambda: pipeline.make_dataset_from_config(
      data_config, tok, "train", batch_size=per_process_batch, seed=config.seed), "data")
  train_iter = iter(train_ds)
  eval_ds = pipeline.make_dataset_from_config(
      data_config, tok, "validation", batch_size=per_process_batch, seed=config.seed)

  mngr = checkpoint_manager(workdir, config)
  latest = mngr.latest_step()
  if latest is None:
    state, _ = init_train_state(objective, tx, mesh, axis_rules, jax.random.key(config.seed),
                                config.data.seq_len)
  else:  # restored straight into sharded buffers: no initialised copy alongside
    state, data_state = restore_checkpoint(mngr, latest, abstract_state)
    if data_state is not None:
      pipeline.restore_iterator_state(train_iter, data_state)
    logging.info("resumed from checkpoint step %d in %s", latest, mngr.directory)
    print(f"Resumed from step {latest} ({mngr.directory})", flush=True)

  writer = MetricWriter(os.path.join(workdir, "tensorboard"), enabled=is_chief)
  n_params = config_lib.model_config(config, tok.vocab_size).num_params()
  edit_start = config_lib.edit_start_step(config)
  is_diffusion = config.model.attention != "causal"
  num_steps = config.train.num_steps
  tokens_per_step = config.train.batch_size * config.data.seq_len
  step = int(state.step)
  if is_chief:
    stages = f", edit stage from step {edit_start}" if is_diffusion else ""
    print(f"Training {config.model.attention} model: {n_params / 1e6:.2f}M parameters, "
          f"vocab {tok.vocab_size}, mesh {dict(mesh.shape)}, steps {step}->{num_steps}{stages}",
          flush=True)

  base_key = jax.random.key(config.seed + 2)
  last_eval: dict[str, float] = {}
  pending: list[dict] = []
  interval_start, interval_steps = time.perf_counter(), 0
  run_start_step, run_start = step, time.perf_counter()
  preempted = False
  with _Preemption() as preemption:
    while step < num_steps:
      with_edit = is_diffusion and step >= edit_start
      batch = global_batch(next(train_iter), mesh)
      state, metrics = train_step(state, batch, base_key, with_edit=with_edit)
      step += 1
      interval_steps += 1
      pending.append(metrics)
      last = step == num_steps
      stop = preemption.stop_now(sync_point=step % config.train.log_every == 0 or last)
      if step % config.train.log_every == 0 or last or stop:
        _check_finite(state, config)
        elapsed = time.perf_counter() - interval_start
        means = {k: float(np.mean([jax.device_get(m[k]) for m in pending if k in m]))
                 for k in pending[-1] if k != "valid_tokens"}
        rate = interval_steps * tokens_per_step / max(elapsed, 1e-9)
        eta = (num_steps - step) * elapsed / max(interval_steps, 1)
        stage = "mask+edit" if with_edit else ("mask" if is_diffusion else "ar")
        writer.scalars(step, {**{f"train/{k}": v for k, v in means.items()},
                              "train/tokens_per_s": rate, "train/stage": float(with_edit),
                              "train/learning_rate": float(lr_schedule(config)(step))})
        if is_chief:
          print(f"step {step}/{num_steps} [{stage}] loss {means['loss']:.4f} bits/tok | "
                f"{rate:,.0f} tok/s | ETA {format_duration(eta)}", flush=True)
        pending, interval_start, interval_steps = [], time.perf_counter(), 0
      if step % config.train.eval_every == 0 or last:
        last_eval = evaluate(eval_step, state.params, eval_ds, config, mesh, with_edit)
        writer.scalars(step, {f"eval/{k[5:]}": v for k, v in last_eval.items()})
        if is_chief:
          print(f"eval step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()),
                flush=True)
        interval_start = time.perf_counter()
      if step % config.train.checkpoint_every == 0 or last or stop:
        save_checkpoint(mngr, state, pipeline.iterator_state(train_iter), force=stop)
      if stop:
        preempted = True
        if is_chief:
          print(f"SIGTERM: saved checkpoint at step {step}; exiting (rerun to resume).", flush=True)
        break
  mngr.wait_until_finished()
  mngr.close()
  writer.flush()
  writer.close()
  if is_chief and step > run_start_step:
    wall = time.perf_counter() - run_start
    print(f"Done: {step - run_start_step} steps in {format_duration(wall)} "
          f"({(step - run_start_step) * tokens_per_step / wall:,.0f} tok/s incl. compile and eval)",
          flush=True)
  return TrainResult(state=state, metrics=last_eval, preempted=preempted, workdir=workdir)


def _check_finite(state: TrainState, config: ml_collections.ConfigDict) -> None:
  bad = int(state.first_nonfinite_step)
  if bad >= 0 and config.train.nonfinite == "stop":
    raise FloatingPointError(
        f"non-finite loss or gradient at step {bad + 1} (the update was not applied); "
        "lower train.learning_rate, or set train.nonfinite='skip' to skip such updates")
