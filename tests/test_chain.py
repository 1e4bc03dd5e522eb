"""`python -m sdiff_jax.chain`: every stage of the training chain end to end on a tiny
model, each stage starting from the previous one's model, and a rerun that resumes."""

import collections
import json
import os

import pytest

from helpers import tiny_config
from sdiff_jax import chain, checkpointing, train, trajectories
from sdiff_jax.data import tokenizer as tokenizer_lib


def _config(ar_workdir=""):
  """The tiny model on the task testbed (bytes: a task's prompt is at most ~400 tokens)."""
  config = tiny_config("tasks", num_steps=4, log_every=2, eval_every=4)
  config.data.seq_len = 512
  config.chain.update(
    pool_prompts=4,
    pool_prompt_len=448,
    pool_max_new_tokens=16,
    pool_steps_per_block=(4,),
    distill_steps=2,
    onpolicy_steps=2,
    eval_prompts=2,
    eval_heldout_rows=2,
    eval_steps_per_block=(2,),
    eval_tasks=2,
    ar_workdir=ar_workdir,
  )
  config.onpolicy.update(
    samples=4, prompt_len=448, max_new_tokens=16, steps_per_block=4, verifiers="tests,varied"
  )
  return config


@pytest.fixture(scope="module")
def ar_workdir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("ar") / "ar")
  config = tiny_config("tasks", "causal", num_steps=2, log_every=2, eval_every=2)
  config.data.seq_len = 512
  train.train_and_evaluate(config, root)
  return root


def test_chain_runs_every_stage_and_resumes(ar_workdir, tmp_path):
  root = str(tmp_path / "chain")
  printed = []
  rows = chain.run(_config(ar_workdir), root, log=printed.append)

  steps = {
    name: checkpointing.latest_step(checkpointing.Workdir(f"{root}/{name}"))
    for name in chain.TRAINED
  }
  assert steps == {"pretrain": 4, "distill": 2, "onpolicy": 2}
  assert trajectories.selected_paths(f"{root}/pool")
  # the pool's prompts are the tasks' own (helper, def line, docstring): bodies follow
  pool = trajectories.read(trajectories.selected_paths(f"{root}/pool"))
  tok = tokenizer_lib.ByteTokenizer()
  assert all(tok.decode(t.prompt).rstrip().endswith('"""') for t in pool)
  distill = json.load(open(f"{root}/distill/config.json"))
  onpolicy = json.load(open(f"{root}/onpolicy/config.json"))
  assert distill["train"]["init_from"] == f"{root}/pretrain"
  assert distill["distill"]["pool"] == f"{root}/pool"
  assert onpolicy["train"]["init_from"] == f"{root}/distill"
  assert onpolicy["onpolicy"]["enabled"] and not onpolicy["distill"]["pool"]
  # every stage evaluated on both splits at both settings (2 steps; 4 steps + threshold),
  # the AR baseline token by token; a table printed and the plot written
  passes = [r for r in rows if r["suite"] == "tasks" and r["metric"] == "pass@1"]
  by_stage = collections.Counter(r["stage"] for r in passes)
  assert by_stage == {"ar": 2, **{name: 2 * 4 for name in chain.TRAINED}}
  assert all(r["settings"] == {} for r in passes if r["stage"] == "ar")
  assert json.load(open(f"{root}/chain.json")) == rows
  assert printed[-1] == f"wrote {root}/chain.png" and os.path.getsize(f"{root}/chain.png") > 0
  assert printed[-2].startswith("| stage | held-out bits/token")
  assert all(f"| {stage} |" in printed[-2] for stage in ("ar", *chain.TRAINED))

  again = []
  rows_again = chain.run(_config(ar_workdir), root, log=again.append)
  assert not any(line.startswith("step ") for line in again)  # nothing retrained
  # nor evaluated: each model's rows come back from its eval file, the same rows
  assert not any(line.startswith("===== evaluating") for line in again)
  assert sum("evaluated before" in line for line in again) == 1 + len(chain.TRAINED)
  assert rows_again == json.loads(json.dumps(rows))


def test_chain_checks_the_ar_workdir_before_training(tmp_path):
  with pytest.raises(FileNotFoundError):
    chain.run(_config(str(tmp_path / "missing")), str(tmp_path / "chain"))
  assert not os.path.exists(tmp_path / "chain" / "pretrain")


def test_table_of_validity_rows():
  rows = [
    {"stage": "pretrain", "suite": "nelbo", "metric": "bits_elbo", "value": 2.5, "stderr": 0.1},
  ] + [
    {
      "stage": "pretrain",
      "suite": "validity",
      "metric": "parses",
      "value": value,
      "stderr": 0.05,
      "settings": {"steps_per_block": steps, "threshold": None},
      "completion_entropy": 4.0,
      "tokens_per_forward": 32 / steps,
    }
    for steps, value in ((4, 0.5), (8, 0.75))
  ]
  lines = chain.table(rows).splitlines()
  assert lines[0].startswith("| stage | held-out bits/token") and "parses" in lines[0]
  assert lines[2] == "| pretrain | 2.500 +- 0.100 | 4 steps | 0.500 +- 0.050, 4.00 bits (8.00) |"
  assert lines[3] == "|  |  | 8 steps | 0.750 +- 0.050, 4.00 bits (4.00) |"
