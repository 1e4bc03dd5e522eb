"""Training: the optimizer, the sharded train state, jitted train/eval steps, the loop.

The loss is `objective.Objective`'s. The curriculum stage (`config_lib.stage_at`: "ar",
"mask", "mask+edit") is a static argument of the steps, so each stage compiles once.
Checkpoints and the workdir are `checkpointing`'s.
"""

import dataclasses
import functools
import os
import shutil
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
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sdiff_jax import checkpointing, config_lib, onpolicy, sharding, trajectories
from sdiff_jax.data import pipeline, sources
from sdiff_jax.data import tokenizer as tokenizer_lib
from sdiff_jax.metric_writer import MetricWriter, format_duration
from sdiff_jax.objective import Batch, Objective


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32[]
  params: Any
  opt_state: Any
  first_nonfinite_step: jax.Array  # int32[]; -1 while every loss has been finite


# ----------------------------------------------------------------------------- optimizer + state


def lr_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine decay to `end_lr_fraction` of it."""
  t = config.train
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=t.learning_rate,
    warmup_steps=t.warmup_steps,
    decay_steps=max(t.num_steps, t.warmup_steps + 1),
    end_value=t.learning_rate * t.end_lr_fraction,
  )


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  t = config.train
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
    optax.clip_by_global_norm(t.grad_clip),
    optax.adamw(lr_schedule(config), b1=0.9, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask),
  )


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """A config's objective, optimizer and train state layout on a mesh.

  `abstract_state` holds ShapeDtypeStructs carrying their shardings (nothing is
  allocated): the target of a restore, or of `lower` for a compile-only run.
  """

  objective: Objective
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  abstract_state: TrainState
  shardings: TrainState  # NamedSharding leaves

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, vocab_size: int, mesh) -> "TrainSetup":
    objective, tx = Objective(config, vocab_size), make_optimizer(config)
    boxed = jax.eval_shape(_init_fn(objective, tx, config.data.seq_len), jax.random.key(0))
    abstract, shardings = sharding.abstract_sharded(boxed, mesh, sharding.rules(config.mesh))
    return cls(objective, tx, mesh, abstract, shardings)

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self.objective.config

  def init_state(self, key: jax.Array) -> TrainState:
    """A fresh state, initialised directly into its shardings."""
    init = _init_fn(self.objective, self.tx, self.config.data.seq_len)
    return jax.jit(lambda k: nn.meta.unbox(init(k)), out_shardings=self.shardings)(key)

  def state_from_params(self, params: Any) -> TrainState:
    """Step 0 with these parameters and a fresh optimizer state."""
    fresh = lambda p: TrainState(
      step=jnp.zeros((), jnp.int32),
      params=p,
      opt_state=self.tx.init(p),
      first_nonfinite_step=jnp.full((), -1, jnp.int32),
    )
    return jax.jit(fresh, out_shardings=self.shardings)(params)


def _init_fn(objective: Objective, tx: optax.GradientTransformation, seq_len: int):
  def init(key):
    params = objective.init_params(key, seq_len)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      first_nonfinite_step=jnp.full((), -1, jnp.int32),
    )

  return init


# ----------------------------------------------------------------------------- steps


def make_train_step(setup: TrainSetup) -> Callable[..., tuple[TrainState, dict]]:
  """jit(train_step) with shardings and donation; `stage` is static."""
  objective, tx, mesh = setup.objective, setup.tx, setup.mesh
  grad_accum_steps = setup.config.train.grad_accum_steps

  def grads_of(params, batch, key, stage):
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if grad_accum_steps == 1:
      (_, metrics), grads = grad_fn(params, batch, key, stage)
      return grads, metrics
    # Micro-batch i takes rows i, i + n, i + 2n, ... (n = grad_accum_steps): every
    # device keeps its own rows, so the split moves no data and each micro-batch
    # stays sharded over (data, fsdp). A (n, B/n) split would put the sharding on
    # the scan axis and hand every device whole micro-batches.
    split = lambda x: jax.lax.with_sharding_constraint(
      jnp.swapaxes(x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:]), 0, 1),
      NamedSharding(mesh, P(None, *sharding.batch_sharding(mesh).spec)),
    )
    micro = jax.tree.map(split, batch)

    def one(micro_batch, key):
      micro_batch = jax.lax.with_sharding_constraint(micro_batch, sharding.batch_sharding(mesh))
      (_, metrics), grads = grad_fn(params, micro_batch, key, stage)
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

  def train_step(state: TrainState, batch: Batch, key: jax.Array, stage: str):
    rows, shards = batch["tokens"].shape[0], mesh.shape["data"] * mesh.shape["fsdp"]
    if (rows // grad_accum_steps) % shards:
      raise ValueError(
        f"a micro-batch of {rows} rows / {grad_accum_steps} accumulation steps does not "
        f"split over the {shards} (data x fsdp) devices: make train.batch_size / "
        f"train.grad_accum_steps a multiple of {shards}"
      )
    key = jax.random.fold_in(key, state.step)
    grads, metrics = grads_of(state.params, batch, key, stage)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree_utils.tree_norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    first_bad = jnp.where(
      (state.first_nonfinite_step < 0) & ~finite, state.step, state.first_nonfinite_step
    )
    new_state = TrainState(
      step=state.step + 1,
      params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      first_nonfinite_step=first_bad,
    )
    return new_state, {**metrics, "grad_norm": grad_norm}

  return _PerStage(
    train_step,
    mesh,
    sharding.rules(setup.config.mesh),
    in_shardings=(setup.shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
    out_shardings=(setup.shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )


class _PerStage:
  """One jit of `fn(..., stage)` per curriculum stage; call as f(*args, stage=...).

  Traced under `sharding.activation_rules`, so the model's activations keep their
  rows sharded over (data, fsdp) instead of whatever XLA's propagation picks.
  """

  def __init__(self, fn, mesh, axis_rules, **jit_kwargs):
    self._context = lambda: sharding.activation_rules(mesh, axis_rules)
    self._jitted = {
      stage: jax.jit(functools.partial(fn, stage=stage), **jit_kwargs)
      for stage in config_lib.STAGES
    }

  def __call__(self, *args, stage: str):
    with self._context():
      return self._jitted[stage](*args)

  def lower(self, *args, stage: str):
    """Lowers for abstract arguments (jax.ShapeDtypeStruct), e.g. to compile without data."""
    with self._context():
      return self._jitted[stage].lower(*args)


def make_eval_step(setup: TrainSetup):
  """Validation metrics with the training objective (edit term included when asked)."""

  def eval_step(params, batch, key, stage):
    return setup.objective(params, batch, key, stage)[1]

  mesh = setup.mesh
  return _PerStage(
    eval_step,
    mesh,
    sharding.rules(setup.config.mesh),
    in_shardings=(setup.shardings.params, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
    out_shardings=sharding.replicated(mesh),
  )


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


def evaluate(eval_step, params, eval_ds, config, mesh, stage: str) -> dict[str, float]:
  """Token-weighted mean of the validation metrics over the same `eval_batches` batches."""
  totals: dict[str, float] = {}
  weight = 0.0
  key = jax.random.key(config.seed + 1)
  for i, batch in zip(range(config.train.eval_batches), iter(eval_ds)):
    m = jax.device_get(
      eval_step(params, sharding.global_batch(batch, mesh), jax.random.fold_in(key, i), stage=stage)
    )
    w = float(m.pop("valid_tokens"))
    weight += w
    for k, v in m.items():
      totals[k] = totals.get(k, 0.0) + w * float(v)
  return {f"eval_{k}": v / max(weight, 1.0) for k, v in totals.items()}


def build_tokenizer(
  config: ml_collections.ConfigDict, workdir: checkpointing.Workdir
) -> tokenizer_lib.Tokenizer:
  """The workdir's tokenizer, trained on the training split and saved there on first use
  (copied from `train.init_from`'s workdir when the run starts from one)."""
  d = config.data
  if config.train.init_from and not os.path.isdir(workdir.tokenizer):
    source = checkpointing.Workdir(config.train.init_from)
    if not os.path.isdir(source.tokenizer):
      raise FileNotFoundError(
        f"train.init_from={source.path}: no tokenizer in {source.tokenizer} (not a trained workdir)"
      )
    shutil.copytree(source.tokenizer, workdir.tokenizer)
  return tokenizer_lib.get_or_build_tokenizer(
    workdir.tokenizer,
    d.tokenizer,
    d.vocab_size,
    lambda: sources.load_corpus(d.source, "train", d.valid_fraction),
    d.tokenizer_max_bytes,
  )


def _data_config(config: ml_collections.ConfigDict, workdir: checkpointing.Workdir):
  """config.data with TFDS ArrayRecords defaulting to the workdir."""
  data_config = ml_collections.ConfigDict(config.data.to_dict())
  data_config.tfds_data_dir = data_config.tfds_data_dir or workdir.tfds
  return data_config


def make_datasets(
  config: ml_collections.ConfigDict, workdir: checkpointing.Workdir, tok: tokenizer_lib.Tokenizer
):
  """(training, validation) datasets of this process's rows; ArrayRecords (tfds) default
  to the workdir."""
  data_config = _data_config(config, workdir)
  rows = config.train.batch_size // jax.process_count()
  eval_ds = pipeline.make_dataset_from_config(
    data_config, tok, "validation", batch_size=rows, seed=config.seed
  )
  pool = config.distill.pool and trajectories.selected_paths(config.distill.pool)
  train_ds = sharding.chief_first(
    lambda: pipeline.make_dataset_from_config(
      data_config, tok, "train", batch_size=rows, seed=config.seed
    ),
    "data",
  )
  if pool:  # the "distill" stage: (state, final) pairs beside the anchor's rows
    pairs = trajectories.DistillPairs(pool, rows, config.seed, config.data.seq_len)
    return trajectories.WithPairs(iter(train_ds), pairs), eval_ds
  return train_ds, eval_ds


def make_rollouts(
  config: ml_collections.ConfigDict, workdir: checkpointing.Workdir, tok: tokenizer_lib.Tokenizer
) -> onpolicy.Rollouts | None:
  """The "onpolicy" stage's trajectory sampler (None in other runs)."""
  if not config.onpolicy.enabled:
    return None
  data_config = _data_config(config, workdir)
  texts = pipeline.load_texts(data_config, "train")
  return onpolicy.Rollouts(config, tok, texts, config.train.batch_size // jax.process_count())


# stage -> the train metrics the console line shows beside the loss: (key, label, digits)
_SHOWN = {
  "onpolicy": (
    ("onpolicy_verified", "verified", 3),
    ("onpolicy_generated", "tokens", 1),
    ("onpolicy_steps", "steps", 1),
    ("onpolicy_tokens_per_step", "tokens/step", 2),
  )
}


class _Logger:
  """Averages the train metrics between logging steps; console (chief) and TensorBoard."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: checkpointing.Workdir):
    self.config, self.is_chief = config, jax.process_index() == 0
    self.writer = MetricWriter(workdir.tensorboard, enabled=self.is_chief)
    self.tokens_per_step = config.train.batch_size * config.data.seq_len
    self.lr = lr_schedule(config)
    self.pending: list[dict] = []  # train metrics of the steps since the last log
    self.start = time.perf_counter()

  def restart_clock(self) -> None:
    """Starts timing the next interval (after work that is not training, e.g. evaluation)."""
    self.start = time.perf_counter()

  def print(self, text: str) -> None:
    if self.is_chief:
      print(text, flush=True)

  def train(self, step: int, stage: str) -> None:
    """Logs the mean of the `pending` metrics and the throughput since the last call."""
    num_steps, steps = self.config.train.num_steps, len(self.pending)
    elapsed = time.perf_counter() - self.start
    means = {
      k: float(np.mean([jax.device_get(m[k]) for m in self.pending if k in m]))
      for k in self.pending[-1]
      if k != "valid_tokens"
    }
    rate = steps * self.tokens_per_step / max(elapsed, 1e-9)
    eta = (num_steps - step) * elapsed / max(steps, 1)
    self.writer.scalars(
      step,
      {
        **{f"train/{k}": v for k, v in means.items()},
        "train/tokens_per_s": rate,
        "train/stage": float(config_lib.STAGES.index(stage)),
        "train/learning_rate": float(self.lr(step)),
      },
    )
    shown = "".join(
      f" | {label} {means[k]:.{digits}f}"
      for k, label, digits in _SHOWN.get(stage, ())
      if k in means
    )
    self.print(
      f"step {step}/{num_steps} [{stage}] loss {means['loss']:.4f} bits/tok{shown} | "
      f"{rate:,.0f} tok/s | ETA {format_duration(eta)}"
    )
    self.pending = []
    self.restart_clock()

  def eval(self, step: int, metrics: dict[str, float]) -> None:
    self.writer.scalars(step, {f"eval/{k[5:]}": v for k, v in metrics.items()})
    self.print(f"eval step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

  def close(self) -> None:
    self.writer.flush()
    self.writer.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
  """Trains `config` in `workdir`, resuming from its latest checkpoint."""
  config_lib.validate(config)
  paths = checkpointing.Workdir(workdir)
  tok = sharding.chief_first(lambda: build_tokenizer(config, paths), "tokenizer")
  if jax.process_index() == 0:
    paths.write_config(config)
  mesh = sharding.make_mesh(config.mesh)
  setup = TrainSetup.create(config, tok.vocab_size, mesh)
  train_step, eval_step = make_train_step(setup), make_eval_step(setup)
  train_ds, eval_ds = make_datasets(config, paths, tok)
  rollouts = make_rollouts(config, paths, tok)
  train_iter = iter(train_ds)  # WithPairs is its own iterator
  mngr = checkpointing.manager(paths, config.train.keep_checkpoints)
  state = _initial_state(setup, mngr, train_iter)
  if rollouts is not None and config.onpolicy.kl_weight > 0:  # the KL anchor's model
    source = checkpointing.Workdir(config.train.init_from)
    rollouts.reference, _ = _params_from_workdir(setup, source)

  log = _Logger(config, paths)
  if isinstance(train_ds, trajectories.WithPairs):  # + pair rows of the pool's length
    log.tokens_per_step += config.train.batch_size * train_ds.pairs.length
  if rollouts is not None:  # + one policy-gradient row per trajectory
    log.tokens_per_step += config.train.batch_size * rollouts.length
  num_steps, step = config.train.num_steps, int(state.step)
  stages = ", ".join(
    f"{name} from step {start}" for name, start in config_lib.stage_starts(config).items()
  )
  log.print(
    f"Training {config.attention} model: "
    f"{setup.objective.model_cfg.num_params() / 1e6:.2f}M parameters, "
    f"vocab {tok.vocab_size}, mesh {dict(mesh.shape)}, steps {step}->{num_steps} "
    f"({stages})"
  )
  key = jax.random.key(config.seed + 2)
  first_step, run_start = step, time.perf_counter()
  last_eval: dict[str, float] = {}
  preempted = False
  with _Preemption() as preemption:
    while step < num_steps:
      stage = config_lib.stage_at(config, step)
      batch, rollout_metrics = next(train_iter), {}
      if rollouts is not None:  # trajectories of the current parameters
        pair_rows, rollout_metrics = rollouts(state.params, step)
        batch = {**batch, **pair_rows}
      state, metrics = train_step(state, sharding.global_batch(batch, mesh), key, stage=stage)
      step += 1
      log.pending.append({**metrics, **rollout_metrics})
      last = step == num_steps
      log_now = step % config.train.log_every == 0 or last
      stop = preemption.stop_now(sync_point=log_now)
      if log_now or stop:
        _check_finite(state, config)
        log.train(step, stage)
      if step % config.train.eval_every == 0 or last:
        # distillation and on-policy runs are watched on the held-out diffusion loss
        eval_stage = "mask+edit" if stage in ("distill", "onpolicy") else stage
        last_eval = evaluate(eval_step, state.params, eval_ds, config, mesh, eval_stage)
        log.eval(step, last_eval)
        log.restart_clock()
      if step % config.train.checkpoint_every == 0 or last or stop:
        checkpointing.save(mngr, state, pipeline.iterator_state(train_iter), force=stop)
      if stop:
        preempted = True
        log.print(f"SIGTERM: saved checkpoint at step {step}; exiting (rerun to resume).")
        break
  mngr.wait_until_finished()
  mngr.close()
  log.close()
  if step > first_step:
    wall = time.perf_counter() - run_start
    log.print(
      f"Done: {step - first_step} steps in {format_duration(wall)} "
      f"({(step - first_step) * log.tokens_per_step / wall:,.0f} tok/s incl. compile "
      "and eval)"
    )
  return TrainResult(state=state, metrics=last_eval, preempted=preempted, workdir=paths.path)


def _initial_state(setup: TrainSetup, mngr, train_iter) -> TrainState:
  """The latest checkpoint's state (and data position), restored straight into sharded
  buffers; else a fresh state."""
  latest = mngr.latest_step()
  if latest is None and setup.config.train.init_from:
    return _state_from_workdir(setup, checkpointing.Workdir(setup.config.train.init_from))
  if latest is None:
    return setup.init_state(jax.random.key(setup.config.seed))
  state, data_state = checkpointing.restore(mngr, latest, setup.abstract_state)
  if data_state is not None:
    pipeline.restore_iterator_state(train_iter, data_state)
  logging.info("resumed from checkpoint step %d in %s", latest, mngr.directory)
  if jax.process_index() == 0:
    print(f"Resumed from step {latest} ({mngr.directory})", flush=True)
  return state


# Model fields that decide the parameters' shapes.
_SHAPE_FIELDS = (
  "d_model",
  "n_layers",
  "n_heads",
  "n_kv_heads",
  "head_dim",
  "d_ff",
  "tie_embeddings",
  "qkv_bias",
)


def _state_from_workdir(setup: TrainSetup, source: checkpointing.Workdir) -> TrainState:
  """A fresh state whose parameters are `source`'s latest (any attention mode)."""
  params, note = _params_from_workdir(setup, source)
  if jax.process_index() == 0:
    print(note, flush=True)
  return setup.state_from_params(params)


def _params_from_workdir(setup: TrainSetup, source: checkpointing.Workdir) -> tuple[Any, str]:
  """`source`'s latest parameters in this run's layout, and a line saying what was loaded."""
  theirs = source.read_config()
  ours = setup.config
  differ = [
    f"model.{f}: {theirs.model[f]} there, {ours.model[f]} here"
    for f in _SHAPE_FIELDS
    if theirs.model[f] != ours.model[f]
  ]
  if differ:
    raise ValueError(f"train.init_from={source.path} has another model shape: " + "; ".join(differ))
  step = checkpointing.latest_step(source)
  params = checkpointing.restore_params(source, step, setup.abstract_state.params)
  # Parameters this model has and the source does not (e.g. `model.read_next` when adapting
  # an AR model) come back as placeholders: they keep their fresh initialisation.
  missing = [
    jax.tree_util.keystr(path)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    if isinstance(leaf, jax.ShapeDtypeStruct)
  ]
  if missing:
    fresh = setup.init_state(jax.random.key(setup.config.seed)).params
    params = jax.tree.map(
      lambda theirs, ours: ours if isinstance(theirs, jax.ShapeDtypeStruct) else theirs,
      params,
      fresh,
    )
  note = f"; freshly initialised: {', '.join(missing)}" if missing else ""
  return params, f"Initialised from {source.path} (step {step}, {theirs.attention} model){note}"


def _check_finite(state: TrainState, config: ml_collections.ConfigDict) -> None:
  bad = int(state.first_nonfinite_step)
  if bad >= 0 and config.train.nonfinite == "stop":
    raise FloatingPointError(
      f"non-finite loss or gradient at step {bad + 1} (the update was not applied); "
      "lower train.learning_rate, or set train.nonfinite='skip' to skip such updates"
    )
