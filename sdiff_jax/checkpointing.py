"""The workdir's layout, and saving / restoring what a run keeps there.

    WORKDIR/config.json     the run's config (`config_lib.from_json` reads any version)
    WORKDIR/tokenizer/      the tokenizer the model was trained with
    WORKDIR/checkpoints/N/  orbax: `state` (the TrainState) and `data` (every
                            process's data iterator state, JSON)
    WORKDIR/tensorboard/    metrics
    WORKDIR/tfds/           ArrayRecords when data.backend="tfds" and no tfds_data_dir

A resumed run restores the state and its data position; sampling and evaluation
restore the parameters alone (`restore_params`), without the optimizer's moments. An
imported model (`sdiff_jax.convert`) holds checkpoint 0 with its parameters alone
(`save_params`): runs start from it through `train.init_from`.
"""

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from sdiff_jax import config_lib


class CheckpointError(RuntimeError):
  """A checkpoint in the workdir could not be restored."""


@dataclasses.dataclass(frozen=True)
class Workdir:
  """Paths inside a training workdir."""

  path: str

  def __post_init__(self):
    object.__setattr__(self, "path", os.path.abspath(self.path))

  @property
  def config(self) -> str:
    return os.path.join(self.path, "config.json")

  @property
  def tokenizer(self) -> str:
    return os.path.join(self.path, "tokenizer")

  @property
  def checkpoints(self) -> str:
    return os.path.join(self.path, "checkpoints")

  @property
  def tensorboard(self) -> str:
    return os.path.join(self.path, "tensorboard")

  @property
  def tfds(self) -> str:
    return os.path.join(self.path, "tfds")

  def write_config(self, config: ml_collections.ConfigDict) -> None:
    os.makedirs(self.path, exist_ok=True)
    with open(self.config, "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  def read_config(self) -> ml_collections.ConfigDict:
    """The saved config; FileNotFoundError with a hint when this is not a workdir."""
    if not os.path.isdir(self.path) or not os.listdir(self.path):
      raise FileNotFoundError(
        f"workdir {self.path} is missing or empty: train a model first, e.g. "
        f"python -m sdiff_jax.main --config=configs/quickstart.py --workdir={self.path}"
      )
    if not os.path.isfile(self.config):
      raise FileNotFoundError(f"{self.config} is missing: {self.path} is not a training workdir")
    with open(self.config) as f:
      return config_lib.from_json(f.read())


def manager(workdir: Workdir, keep: int = 3) -> ocp.CheckpointManager:
  """Async orbax manager of `workdir`'s checkpoints, keeping the newest `keep`."""
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep, create=True, enable_async_checkpointing=True
  )
  return ocp.CheckpointManager(workdir.checkpoints, options=options)


def save(mngr: ocp.CheckpointManager, state: Any, data_state: dict, force: bool = False) -> None:
  """Saves the state (at its step) and every process's `data_state` (call on all processes)."""
  data = {"process_count": jax.process_count(), "per_process": _gather_data_states(data_state)}
  mngr.save(
    int(state.step),
    args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)),
    force=force,
  )


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict | None]:
  """(state, this process's data iterator state) of `step`, straight into the shardings of
  `abstract_state` (ShapeDtypeStructs); CheckpointError says what went wrong."""
  restored = _restore(
    mngr,
    step,
    ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
  )
  return restored["state"], _this_process_data_state(restored["data"])


def latest_step(workdir: Workdir) -> int:
  """The newest checkpoint's step; FileNotFoundError when there is none."""
  mngr = ocp.CheckpointManager(workdir.checkpoints) if os.path.isdir(workdir.checkpoints) else None
  step = None if mngr is None else mngr.latest_step()
  if mngr is not None:
    mngr.close()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir.checkpoints}: train the model first")
  return step


def restore_params(workdir: Workdir, step: int, abstract_params: Any) -> Any:
  """The parameters of checkpoint `step`, nothing else read (the optimizer state stays on
  disk), into the shardings that `abstract_params` (ShapeDtypeStructs) carry."""
  mngr = ocp.CheckpointManager(workdir.checkpoints)
  item = {"params": abstract_params}
  try:
    restored = _restore(
      mngr,
      step,
      ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
          item=item,
          restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True,
        )
      ),
    )
  finally:
    mngr.close()
  return restored["state"]["params"]


def save_params(workdir: Workdir, params: Any, step: int = 0) -> None:
  """Saves `params` alone as checkpoint `step` (`{"params": ...}` in `state`, no optimizer
  state nor data position): what `restore_params` and `train.init_from` read."""
  with ocp.CheckpointManager(
    workdir.checkpoints, options=ocp.CheckpointManagerOptions(create=True)
  ) as mngr:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params})))
    mngr.wait_until_finished()


def saved_vocab_size(workdir: Workdir, step: int) -> int | None:
  """Embedding rows of a saved train state, from its metadata (None if unreadable)."""
  try:
    metadata = ocp.StandardCheckpointHandler().metadata(
      epath.Path(os.path.join(workdir.checkpoints, str(step), "state"))
    )
    return int(metadata["params"]["embed"]["embedding"].shape[0])
  except Exception:  # an unexpected layout: restoring will say what is wrong
    return None


def _restore(mngr: ocp.CheckpointManager, step: int, args: ocp.args.Composite) -> Any:
  try:
    return mngr.restore(step, args=args)
  except Exception as e:  # orbax raises many types for truncated / missing files
    others = [s for s in mngr.all_steps() if s != step]
    hint = (
      (
        f"; earlier checkpoints {others} are untouched: move {mngr.directory / str(step)} "
        "aside to resume from the newest of them"
      )
      if others
      else ""
    )
    raise CheckpointError(
      f"checkpoint step {step} in {mngr.directory} could not be restored: "
      f"{type(e).__name__}: {str(e)[:300]}{hint}"
    ) from e


def _this_process_data_state(saved: dict) -> dict | None:
  """This process's iterator state from the per-process list a checkpoint holds;
  None (start the data afresh) when the checkpoint was written by another number
  of processes, whose shards of the data do not map onto this run's."""
  count, index = jax.process_count(), jax.process_index()
  if "per_process" not in saved:  # written before per-process states: one process's
    return saved
  if saved["process_count"] != count:
    logging.warning(
      "checkpoint's data iterator states come from %d processes, this run has %d: "
      "the data stream restarts (the model state is restored)",
      saved["process_count"],
      count,
    )
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
  padded_N[: raw_N.size] = raw_N
  every_PxN = np.asarray(multihost_utils.process_allgather(padded_N))
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(every_PxN, lengths_P)]
