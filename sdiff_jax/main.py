r"""Main job: train a Seed Diffusion model from a config, then sample from it.

After training (skipped when the run was preempted), `--sample_prompts` are
completed with the trained model (block-parallel decoding for diffusion
models, token by token for `causal` ones) and printed with decoding statistics; on the
task testbed, held-out test tasks are completed instead, their tests run in the sandbox,
and pass@1 is printed.

    python -m sdiff_jax.main --config=configs/quickstart.py --workdir=/tmp/sdiff
    python -m sdiff_jax.main --config=configs/quickstart.py:causal --workdir=/tmp/ar \
        --config.train.num_steps=100

Reruns with the same workdir resume from the latest checkpoint.
"""

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sdiff_jax import checkpointing, train
from sdiff_jax.data import tasks

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (get_config).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, tokenizer and logs.")
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address",
  None,
  "host:port of process 0 for multi-process runs "
  "(auto-detected on TPU pods and under Slurm when omitted).",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in the job.")
_PROMPTS = flags.DEFINE_multi_string(
  "sample_prompts",
  ["def fibonacci(n):", "class Stack:\n    def __init__(self):"],
  "Prompts completed after training; pass --sample_prompts= (empty) to skip sampling. "
  "On the task testbed (data.source 'tasks') held-out tasks are completed instead, unless "
  "prompts are given.",
)
_REPORT_TASKS = flags.DEFINE_integer(
  "report_tasks",
  128,
  "Task testbed: held-out test tasks completed for the final pass@1 (0: none).",
  lower_bound=0,
)
_STEPS_PER_BLOCK = flags.DEFINE_integer(
  "steps_per_block", 4, "Denoising steps per block when sampling."
)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per prompt.")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
  """Joins a multi-process JAX job when asked to (flags) or when the cluster says so."""
  if _COORDINATOR.value is not None or _NUM_PROCESSES.value is not None:
    if None in (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value):
      raise app.UsageError("--coordinator_address, --num_processes and --process_id go together")
    if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "TPU_WORKER_HOSTNAMES" in os.environ:
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and JAX are chatty at INFO
  initialize_distributed()
  try:
    result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    prompts = [p for p in _PROMPTS.value if p]
    if prompts and not result.preempted:  # every process: restoring onto the mesh is collective
      if tasks.is_source(_CONFIG.value.data.source) and not flags.FLAGS["sample_prompts"].present:
        if _REPORT_TASKS.value:
          show_tasks()
      else:
        show_samples(prompts)
  except (ValueError, FileNotFoundError, checkpointing.CheckpointError, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def show_tasks() -> None:
  """Completes held-out tasks of the testbed, runs their tests and prints pass@1."""
  from sdiff_jax.evaluate import tasks as tasks_suite  # only needed once training is done

  tasks_suite.report(
    _WORKDIR.value, steps_per_block=_STEPS_PER_BLOCK.value, num_tasks=_REPORT_TASKS.value
  )


def show_samples(prompts: list[str]) -> None:
  """Completes `prompts` with the trained model and prints them with decoding statistics."""
  from sdiff_jax import inference  # the sampler is only needed once training is done

  texts, stats = inference.complete(
    _WORKDIR.value,
    prompts,
    steps_per_block=_STEPS_PER_BLOCK.value,
    max_new_tokens=_MAX_NEW_TOKENS.value,
  )
  if jax.process_index() != 0:
    return
  for prompt, text in zip(prompts, texts):
    print(f"----- prompt: {prompt!r}\n{prompt}{text}")
  print(
    f"----- {stats.settings.attention} decoding: NFE {stats.nfe}, "
    f"{stats.tokens_per_forward:.2f} tokens per forward (per row), {stats.seconds:.1f} s "
    "(compilation included)",
    flush=True,
  )


def run():
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
