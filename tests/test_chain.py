"""`python -m sdiff_jax.chain`: every stage of the training chain end to end on a tiny
model, each stage starting from the previous one's model, and a rerun that resumes."""

import json

from helpers import tiny_config
from sdiff_jax import chain, checkpointing, trajectories


def _config(code_corpus_dir):
  config = tiny_config(code_corpus_dir, num_steps=4, log_every=2, eval_every=4)
  config.chain.update(
    pool_prompts=4,
    pool_prompt_len=16,
    pool_max_new_tokens=16,
    pool_steps_per_block=(4,),
    distill_steps=2,
    onpolicy_steps=2,
    eval_prompts=2,
    eval_heldout_rows=2,
    eval_steps_per_block=(2,),
  )
  config.onpolicy.update(samples=4, prompt_len=48, max_new_tokens=16, steps_per_block=4)
  return config


def test_chain_runs_every_stage_and_resumes(code_corpus_dir, tmp_path):
  root = str(tmp_path / "chain")
  printed = []
  rows = chain.run(_config(code_corpus_dir), root, log=printed.append)

  steps = {
    name: checkpointing.latest_step(checkpointing.Workdir(f"{root}/{name}"))
    for name in chain.TRAINED
  }
  assert steps == {"pretrain": 4, "distill": 2, "onpolicy": 2}
  assert trajectories.selected_paths(f"{root}/pool")
  distill = json.load(open(f"{root}/distill/config.json"))
  onpolicy = json.load(open(f"{root}/onpolicy/config.json"))
  assert distill["train"]["init_from"] == f"{root}/pretrain"
  assert distill["distill"]["pool"] == f"{root}/pool"
  assert onpolicy["train"]["init_from"] == f"{root}/distill"
  assert onpolicy["onpolicy"]["enabled"] and not onpolicy["distill"]["pool"]
  # every stage evaluated at both settings (2 steps, 4 steps + threshold), a table printed
  parses = [r for r in rows if r["metric"] == "parses"]
  assert {r["stage"] for r in parses} == set(chain.TRAINED) and len(parses) == 3 * 4
  assert json.load(open(f"{root}/chain.json")) == rows
  assert printed[-1].startswith("| stage | held-out ELBO")
  assert all(stage in printed[-1] for stage in chain.TRAINED)

  again = []
  chain.run(_config(code_corpus_dir), root, log=again.append)
  assert not any(line.startswith("step ") for line in again)  # nothing retrained
