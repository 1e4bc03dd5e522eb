"""The evaluation suites (`python -m sdiff_jax.evaluate`): scoring rules by hand, the CLI
end to end on tiny models."""

import functools
import json
import math
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import run_module, tiny_config
from sdiff_jax import train
from sdiff_jax.data import tokenizer as tokenizer_lib
from sdiff_jax.evaluate import completions, infill, judge, nelbo, repair, validity
from sdiff_jax.objective import Objective

SOURCE = '''import os


def area(w, h):
    """Area of a rectangle.

    Multiplies.
    """
    result = w * h
    return result


def no_doc(x):
    return x


class A:
    def method(self):
        """Not top level."""
        return 1
'''


def test_function_prompts_cut_after_the_docstring():
  (item,) = validity.function_prompts([SOURCE, "def broken(:\n"], count=5)
  assert item.prompt.startswith("def area(w, h):\n") and item.prompt.endswith('    """')
  assert item.reference == "    result = w * h\n    return result\n"
  assert item.indent == "    "


def test_validity_trimming_and_scores():
  (item,) = validity.function_prompts([SOURCE], count=1)
  # the completion's first line ends the prompt's last line (the docstring's quotes)
  body = "\n    result = w * h\n    return result\n"
  exact = validity.score(item, body + "\ndef next_one():\n", False)
  assert exact == {"parses": 1.0, "exact": 1.0, "similarity": 1.0}
  assert validity.score(item, "  # note" + body + "\nx = 1\n", False)["exact"] == 0.0
  # stopped by the token limit: the cut line is dropped, no exact match, similarity against
  # as many reference lines as the completion has
  partial = validity.score(item, "\n    result = w * h\n    retu", False)
  assert partial["parses"] == 1.0 and partial["exact"] == 0.0 and partial["similarity"] == 1.0
  # ended with EOS: the last line counts even without a newline
  assert validity.score(item, "\n    result = w * h\n    return result", True)["exact"] == 1.0
  bad = validity.score(item, "\n    return (\n    x = ]\n", False)
  assert bad["parses"] == 0.0 and bad["exact"] == 0.0 and 0.0 < bad["similarity"] < 1.0
  empty = {"parses": 0.0, "exact": 0.0, "similarity": 0.0}
  assert validity.score(item, "\n\n", False) == empty
  assert validity.score(item, "    result = w * h", True) == empty  # never left the line
  summary = validity.summarise([exact, partial, bad])
  assert summary["parses"][0] == pytest.approx(2 / 3)
  assert summary["parses"][1] == pytest.approx(np.std([1, 1, 0], ddof=1) / math.sqrt(3))


@pytest.mark.parametrize("kind", infill.KINDS)
def test_infill_spans_cut_the_function_into_three(kind):
  items = validity.function_prompts([SOURCE.replace("area", f"area{i}") for i in range(5)], 5)
  spans = infill.make_spans(items, kind, tokenizer_lib.ByteTokenizer(), seed=1)
  assert len(spans) == 5
  for item, sp in zip(items, spans):
    assert sp.before + sp.span + sp.after == item.prompt + "\n" + item.reference
    assert sp.span.strip() and sp.before.startswith(item.prompt)
    if kind == "line":
      assert "\n" not in sp.span and sp.after.startswith("\n")


def test_repair_metrics_by_hand():
  x0 = np.array([[5, 6, 7, 8, 9, 10, 11, 12]])
  x_t = np.array([[5, 6, 99, 8, 9, 10, 11, 98]])  # corrupted at 2 and 7
  scored = np.ones_like(x0, bool)
  perfect = repair.metrics(x0, x_t, x0, scored, snippet=4)
  assert perfect["restored"][0] == 1.0 and perfect["damaged"][0] == 0.0
  assert perfect["exact"][0] == 1.0 and perfect["snippets"][0] == 2
  copy = repair.metrics(x0, x_t, x_t, scored, snippet=4)  # predicts its input: repairs nothing
  assert copy["restored"][0] == 0.0 and copy["damaged"][0] == 0.0 and copy["exact"][0] == 0.0
  half = x0.copy()
  half[0, 7] = 98  # repairs position 2, misses 7, and breaks clean position 0
  half[0, 0] = 4
  m = repair.metrics(x0, x_t, half, scored, snippet=4)
  assert m["restored"][0] == 0.5 and m["damaged"][0] == pytest.approx(1 / 6)
  assert m["exact"][0] == 0.0 and m["corrupted_fraction"][0] == 0.25


def test_unigram_entropy_and_grid():
  assert judge.unigram_entropy([1, 1, 2, 2]) == 1.0
  assert judge.unigram_entropy([3, 3, 3]) == 0.0 and judge.unigram_entropy([]) == 0.0
  grid = completions.settings_grid(
    "bidirectional", steps_per_block=[1, 4], threshold=[], cache_mode=["fold"]
  )
  assert grid == [
    {"steps_per_block": 1, "cache_mode": "fold"},
    {"steps_per_block": 4, "cache_mode": "fold"},
  ]
  assert completions.settings_grid("causal", steps_per_block=[1, 4]) == [{}]


def _train(directory, corpus, attention):
  config = tiny_config(
    corpus, attention=attention, num_steps=2, checkpoint_every=2, eval_every=2, eval_batches=1
  )
  config.curriculum.edit_start_fraction = 1.0
  train.train_and_evaluate(config, str(directory))
  return str(directory)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory, code_corpus_dir):
  root = tmp_path_factory.mktemp("evaluate")
  return {mode: _train(root / mode, code_corpus_dir, mode) for mode in ("bidirectional", "causal")}


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  return run_module("sdiff_jax.evaluate", *args, timeout=timeout)


def test_cli_writes_every_suite_with_errors_and_speed(workdirs, tmp_path):
  out = tmp_path / "eval.json"
  result = _cli(
    f"--workdir={workdirs['bidirectional']}",
    "--suites=nelbo,validity,repair,infill,judge",
    f"--judge_workdir={workdirs['causal']}",
    "--steps_per_block=1,4",
    "--num_prompts=4",
    "--batch_size=2",
    "--heldout_rows=4",
    "--max_new_tokens=16",
    f"--json={out}",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| validity | steps_per_block=4 | parses |" in result.stdout
  rows = json.loads(out.read_text())["rows"]
  by = {(r["suite"], r["metric"], json.dumps(r.get("settings"))): r for r in rows}
  assert {r["suite"] for r in rows} == {"nelbo", "validity", "repair", "infill", "judge"}
  for r in rows:
    assert r["n"] > 0 and np.isfinite(r["value"]) and "stderr" in r
  assert 0 < by[("nelbo", "bits_elbo", "null")]["value"] < 12
  rest = by[("nelbo", "block_bits_rest", "null")]
  assert len(rest["by_offset"]) == 16 and 0 < by[("nelbo", "block_bits_first", "null")]["value"]
  for steps in (1, 4):
    setting = json.dumps({"steps_per_block": steps})
    assert 0 <= by[("validity", "parses", setting)]["value"] <= 1
    judged = by[("judge", "gen_ppl", setting)]
    bits = by[("judge", "judge_bits", setting)]["value"]
    assert judged["value"] == pytest.approx(2**bits, rel=1e-6) and judged["n"] == 4
    # both byte-level: the validity suite's completion entropy is the judge's
    entropy = by[("validity", "completion_entropy", setting)]["value"]
    assert entropy == pytest.approx(by[("judge", "unigram_entropy", setting)]["value"])
  # 16 tokens in one 16-token block: 4 steps commit 4 tokens a forward, 1 step all 16
  one = by[("validity", "parses", json.dumps({"steps_per_block": 1}))]["tokens_per_forward"]
  four = by[("validity", "parses", json.dumps({"steps_per_block": 4}))]["tokens_per_forward"]
  assert one > four > 1
  assert {r["kind"] for r in rows if r["suite"] == "repair"} == {"edit", "substitution"}
  # the tiny corpus's functions have one-line bodies: no "lines" spans
  assert {(r["kind"], r["steps"]) for r in rows if r["suite"] == "infill"} == {
    (kind, steps) for kind in ("line", "random") for steps in (1, 4)
  }


def test_cli_errors_are_clear(workdirs, tmp_path):
  run = functools.partial(_cli, timeout=300)
  bad = run(f"--workdir={workdirs['causal']}", "--suites=nelbo,speling")
  assert bad.returncode != 0 and "unknown suites ['speling']" in bad.stderr
  nojudge = run(f"--workdir={workdirs['causal']}", "--suites=judge")
  assert nojudge.returncode != 0 and "judge_workdir" in nojudge.stderr
  missing = run(f"--workdir={tmp_path / 'nothing'}", "--suites=nelbo")
  assert missing.returncode != 0 and "missing or empty" in missing.stderr


def test_canonical_humaneval_solutions_pass_through_the_cli():
  result = _cli("--canonical", "--humaneval_timeout_s=20")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| humaneval |  | canonical_pass | 1 +- 0 | 164 |" in result.stdout


@pytest.mark.parametrize("attention", ["bidirectional", "block_causal"])
def test_block_bits_match_a_direct_computation(attention, code_corpus_dir):
  """A fully masked block after a clean prefix, the rest dropped: the model's bits at each
  offset, against logits computed by hand on that input; what follows the block and the
  block's own tokens (as input) change nothing."""
  config = tiny_config(code_corpus_dir, attention=attention)
  config.diffusion.shift = config.model.read_next = attention == "bidirectional"
  objective = Objective(config, 64)
  size = config.diffusion.block_size
  rows, length = 3, 2 * size  # one block, at [size, 2 size)
  params = objective.init_params(jax.random.key(0), length)
  rng = np.random.default_rng(0)
  tokens = rng.integers(tokenizer_lib.NUM_SPECIAL, 64, (rows, length)).astype(np.int32)
  heldout = {
    "tokens": tokens,
    "segment_ids": np.ones((rows, length), np.int32),
    "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
  }
  got = nelbo.block_bits(objective, params, heldout, chunk=2)

  cut = {k: jnp.asarray(v[:, : 2 * size]) for k, v in heldout.items()}
  noisy = cut["tokens"].at[:, size:].set(tokenizer_lib.MASK_ID)
  logits = objective.logits(params, noisy, cut)[:, size:]
  logits = logits.at[..., tokenizer_lib.MASK_ID].set(-jnp.inf)  # never a target
  bits_BxK = -jnp.take_along_axis(jax.nn.log_softmax(logits), cut["tokens"][:, size:, None], -1)
  bits_BxK = np.asarray(bits_BxK[..., 0]) / math.log(2)
  np.testing.assert_allclose(got.by_offset, bits_BxK.mean(0), rtol=1e-5)
  assert got.first.mean == pytest.approx(bits_BxK[:, 0].mean(), rel=1e-5)
  assert got.rest.mean == pytest.approx(bits_BxK[:, 1:].mean(), rel=1e-5)
  assert got.blocks == 1 and got.rest.rows == rows

  # what follows the block changes nothing: the first block of rows with two tails
  def first_block(tail):
    longer = {k: np.concatenate([v, v[:, :size]], axis=1) for k, v in heldout.items()}
    longer["tokens"][:, 2 * size :] = tail
    batch = {k: jnp.asarray(v) for k, v in longer.items()}
    return np.asarray(nelbo._block_nll(objective, params, batch, jnp.int32(size), size)[0])

  tails = rng.integers(tokenizer_lib.NUM_SPECIAL, 64, (2, rows, size))
  np.testing.assert_allclose(first_block(tails[0]), first_block(tails[1]), rtol=1e-6)
  np.testing.assert_allclose(first_block(tails[0]), bits_BxK, rtol=1e-5)
