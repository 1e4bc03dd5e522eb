"""Sampling from a trained workdir: the CLI, the library API and its error messages."""

import json
import os
import shutil
import subprocess

import pytest

from helpers import REPO, run_module, tiny_config
from sdiff_jax import inference, train
from sdiff_jax.data import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, code_corpus_dir):
  """A block_causal model trained for 2 steps (mask stage only: one compilation)."""
  config = tiny_config(
    code_corpus_dir,
    attention="block_causal",
    num_steps=2,
    checkpoint_every=2,
    eval_every=2,
    eval_batches=1,
    log_every=1,
  )
  config.curriculum.edit_start_fraction = 1.0
  directory = str(tmp_path_factory.mktemp("sample_workdir"))
  train.train_and_evaluate(config, directory)
  return directory


def _cli(*args: str) -> subprocess.CompletedProcess:
  return run_module("sdiff_jax.sample", *args, timeout=300)


def test_cli_prints_completions_and_the_trajectory(workdir, tmp_path):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(
    json.dumps({"prompt": "def add_1(a, b):"})
    + "\n"
    + json.dumps({"prompt": "class Counter2:\n"})
    + "\n"
  )
  run = _cli(
    f"--workdir={workdir}",
    f"--prompt_file={prompts}",
    "--max_new_tokens=20",
    "--steps_per_block=4",
    "--show_trajectory",
  )
  assert run.returncode == 0, run.stderr
  out = run.stdout
  assert "=== sample 0 ===" in out and "=== sample 1 ===" in out
  assert "def add_1(a, b):" in out and "class Counter2:" in out
  # block 16 (the config's), 4 steps: the first frame still shows masked tokens
  assert "block 0 step 1/4: " in out and "block 1 step 4/4: " in out
  assert inference.MASK_CHAR in out.split("block 0 step 1/4: ")[1].split("\n")[0]
  assert "2 prompt(s), block_causal, block 16" in out and "tokens/forward" in out


def test_cli_error_is_one_clear_line(tmp_path):
  run = _cli(f"--workdir={tmp_path / 'nothing'}", "--prompt=x")
  assert run.returncode == 2
  assert run.stderr.strip().splitlines()[-1].startswith("error: workdir ")
  assert "missing or empty" in run.stderr


def test_generate_is_reproducible_and_reports_statistics(workdir):
  loaded = inference.load_model(workdir)
  assert loaded.tokenizer.vocab_size == tokenizer_lib.BYTE_VOCAB_SIZE
  prompts = ["def add_1(a, b):", "x = "]
  texts, stats = inference.complete(
    loaded, prompts, seed=3, max_new_tokens=24, steps_per_block=2, temperature=1.0
  )
  again, _ = inference.complete(
    loaded, prompts, seed=3, max_new_tokens=24, steps_per_block=2, temperature=1.0
  )
  assert texts == again and len(texts) == 2
  assert stats.settings.attention == "block_causal" and stats.settings.block_size == 16
  # 2 blocks (16 + 8 tokens) of at most 2 steps, plus prefill and one clean forward
  assert stats.nfe <= 1 + 2 * 2 + 1 and stats.tokens_per_forward > 1
  frames = inference.trajectory_frames(loaded.tokenizer, stats, row=0)
  assert len(frames) == int(stats.generation.block_steps.sum())


def test_clear_errors(workdir, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="missing or empty"):
    inference.load_model(str(empty))

  untrained = tmp_path / "untrained"
  untrained.mkdir()
  shutil.copy(os.path.join(workdir, "config.json"), untrained)
  shutil.copytree(os.path.join(workdir, "tokenizer"), untrained / "tokenizer")
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    inference.load_model(str(untrained))

  loaded = inference.load_model(workdir)
  with pytest.raises(ValueError, match=r"prompt 1 is 41 tokens .* context of 64"):
    inference.complete(loaded, ["ok", "x" * 40], max_new_tokens=24)

  other = tmp_path / "other_tokenizer"
  shutil.copytree(workdir, other)
  shutil.rmtree(other / "tokenizer")
  bpe = tokenizer_lib.train_bpe(
    ["def add(a, b):\n    return a + b\n"] * 50, 300, show_progress=False
  )
  bpe.save(other / "tokenizer")
  with pytest.raises(
    ValueError, match=f"{bpe.vocab_size} ids but checkpoint step 2 has a vocabulary of 260"
  ):
    inference.load_model(str(other))


def test_workdir_with_a_first_format_config_json_still_loads(workdir, tmp_path):
  """config.json as the first release wrote it (attention and block_size under `model`,
  no norm_eps / scan_layers) loads as today's config and samples the same."""
  old = tmp_path / "old_format"
  shutil.copytree(workdir, old)
  saved = json.loads(
    open(os.path.join(REPO, "tests", "data", "config_v0_block_causal.json")).read()
  )
  saved["data"]["source"] = json.loads(open(os.path.join(workdir, "config.json")).read())["data"][
    "source"
  ]
  (old / "config.json").write_text(json.dumps(saved))
  loaded, today = inference.load_model(str(old)), inference.load_model(workdir)
  assert loaded.config == today.config
  assert loaded.config.attention == "block_causal" and loaded.config.diffusion.block_size == 16
  kwargs = dict(seed=1, max_new_tokens=20, steps_per_block=2)
  assert (
    inference.complete(loaded, ["x = "], **kwargs)[0]
    == inference.complete(today, ["x = "], **kwargs)[0]
  )
