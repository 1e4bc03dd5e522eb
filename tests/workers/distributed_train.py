"""One process of a (possibly multi-process) training job, for tests/test_multiprocess.py.

    python distributed_train.py OUT_DIR NUM_PROCESSES PROCESS_ID PORT

Trains the tiny bidirectional model for 3 steps on deterministic global batches
(each process feeds its own rows), saves an orbax checkpoint from every process,
restores it into a fresh state and takes one more step. Process 0 writes the
losses and final parameters to OUT_DIR/result.npz.
"""

import os
import sys

out_dir, num_processes, process_id, port = (
  sys.argv[1],
  int(sys.argv[2]),
  int(sys.argv[3]),
  sys.argv[4],
)

import jax  # noqa: E402

if num_processes > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    f"localhost:{port}", num_processes=num_processes, process_id=process_id
  )

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import tiny_config  # noqa: E402
from sdiff_jax import checkpointing, sharding, train  # noqa: E402

VOCAB, ROWS, LENGTH = 64, 8, 64


def local_rows(step: int) -> dict[str, np.ndarray]:
  """This process's slice of a global batch that depends only on `step`."""
  rng = np.random.default_rng(step)
  tokens = rng.integers(4, VOCAB, (ROWS, LENGTH)).astype(np.int32)
  seg = np.ones((ROWS, LENGTH), np.int32)
  seg[:, LENGTH // 2 :] = 2
  pos = np.where(seg == 1, np.arange(LENGTH), np.arange(LENGTH) - LENGTH // 2).astype(np.int32)
  per = ROWS // jax.process_count()
  rows = slice(jax.process_index() * per, (jax.process_index() + 1) * per)
  return {"tokens": tokens[rows], "segment_ids": seg[rows], "positions": pos[rows]}


def main():
  config = tiny_config("unused", attention="bidirectional")
  config.mesh.data = -1
  mesh = sharding.make_mesh(config.mesh)
  setup = train.TrainSetup.create(config, VOCAB, mesh)
  state = setup.init_state(jax.random.key(0))
  step_fn = train.make_train_step(setup)
  losses = []
  for i in range(3):
    state, metrics = step_fn(
      state,
      sharding.global_batch(local_rows(i), mesh),
      jax.random.key(1),
      stage="mask+edit" if i == 2 else "mask",
    )
    losses.append(float(metrics["loss"]))
  mngr = checkpointing.manager(checkpointing.Workdir(os.path.join(out_dir, "workdir")))
  # Each process reads its own shard, so each saves (and gets back) its own data state.
  checkpointing.save(mngr, state, {"step": 3, "process": jax.process_index()})
  mngr.wait_until_finished()
  state, data = checkpointing.restore(mngr, 3, setup.abstract_state)
  assert data == {"step": 3, "process": jax.process_index()}, data
  state, metrics = step_fn(
    state, sharding.global_batch(local_rows(3), mesh), jax.random.key(1), stage="mask+edit"
  )
  losses.append(float(metrics["loss"]))
  mngr.close()
  params = jax.tree.map(
    lambda x: np.asarray(jax.experimental.multihost_utils.process_allgather(x, tiled=True)),
    state.params,
  )
  if jax.process_index() == 0:
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(os.path.join(out_dir, "result.npz"), losses=np.array(losses), **flat)
  print(
    f"process {jax.process_index()}/{jax.process_count()} devices {jax.device_count()} "
    f"losses {losses}",
    flush=True,
  )


if __name__ == "__main__":
  import jax.experimental.multihost_utils  # noqa: F401

  main()
