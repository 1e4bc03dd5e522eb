"""The generated task testbed (data/tasks.py) and its functional suite (evaluate/tasks.py)."""

import ast
import itertools
import json
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import run_module, tiny_config
from sdiff_jax import inference
from sdiff_jax.data import pipeline, sources, tasks
from sdiff_jax.data import tokenizer as tokenizer_lib
from sdiff_jax.evaluate import completions, sandbox
from sdiff_jax.evaluate import tasks as suite

# Runs every program of a JSON list in a fresh namespace: the indices that raise.
_RUN_ALL = """
import json, sys
failed = []
for i, program in enumerate(json.load(sys.stdin)):
  try:
    exec(compile(program, "<task>", "exec"), {"__name__": "__main__"})
  except BaseException as e:
    failed.append([i, repr(e)])
print(json.dumps(failed))
"""


def test_a_task_is_a_pure_function_of_seed_split_and_index():
  first = [tasks.generate(split, i) for split in tasks.SPLITS for i in range(20)]
  tasks.generate.cache_clear()
  assert first == [tasks.generate(split, i) for split in tasks.SPLITS for i in range(20)]
  other_seed = [tasks.generate("train", i, seed=1) for i in range(20)]
  assert sum(a.text != b.text for a, b in zip(first, other_seed)) >= 15
  assert len({t.text for t in first}) == len(first)
  # another process, another hash seed: the same texts
  script = (
    "import json; from sdiff_jax.data import tasks; "
    "print(json.dumps([tasks.generate('test', i).text for i in range(5)]))"
  )
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
  assert json.loads(out.stdout) == [tasks.generate("test", i).text for i in range(5)]


def test_every_program_passes_its_own_asserts_and_a_wrong_body_fails():
  programs, wrong = [], []
  for split in tasks.SPLITS:
    for i in range(750 if split == "train" else 500):
      t = tasks.generate(split, i)
      programs.append(t.text)
      if i < 40:
        wrong.append(t.program(tasks.INDENT + "return None\n"))
  run = subprocess.run(
    [sys.executable, "-c", _RUN_ALL],
    input=json.dumps(programs + wrong),
    capture_output=True,
    text=True,
    timeout=300,
  )
  failed = dict(json.loads(run.stdout))
  assert not [i for i in failed if i < len(programs)], failed  # 2,250 programs pass
  # asserts tell answers apart: a function that returns None fails (almost) always
  assert sum(i >= len(programs) for i in failed) >= 0.95 * len(wrong)
  # and the sandbox agrees on a few
  for text in programs[:: len(programs) // 8]:
    assert sandbox.run_program(text, timeout_s=5).status == "passed"


def test_tasks_read_like_the_grammar_says():
  for t in (tasks.generate("train", i) for i in range(300)):
    tree = ast.parse(t.text)
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    asserts = [node for node in tree.body if isinstance(node, ast.Assert)]
    assert functions[-1].name == t.entry_point and len(asserts) == tasks.ASSERTS
    assert ast.get_docstring(functions[-1]).strip()
    assert 2 <= len(t.body.splitlines()) <= 10 and t.prompt.endswith('"""\n')
    assert t.text == t.prompt + t.body.rstrip() + "\n\n\n" + t.tests
    if t.composition.filter in ("prime", "palindrome"):  # the helper is in the prompt
      assert len(functions) == 2 and functions[0].name in t.body


def test_phrasings_vary_per_composition():
  """No single docstring maps to one composition: each is phrased several ways."""
  docs = {}
  for t in (tasks.generate("train", i) for i in range(3000)):
    doc = t.prompt.split('"""')[1].split("\n")[0]
    docs.setdefault(str(t.composition), set()).add(doc)
  frequent = [c for c, seen in docs.items() if len(seen) >= 4]
  assert frequent and all(len(docs[c]) >= 2 for c in frequent)


def test_splits_are_disjoint_by_composition_and_combos_are_unseen_pairs():
  by_split = tasks.compositions()
  sets = {split: set(map(str, cs)) for split, cs in by_split.items()}
  for a, b in itertools.combinations(tasks.SPLITS, 2):
    assert not sets[a] & sets[b], (a, b)
  assert all(sets.values()) and len(sets["train"]) > 5 * len(sets["test"])
  others = [c for split in ("train", "validation", "test") for c in by_split[split]]
  seen = {pair for c in others for pair in itertools.combinations(c.pieces, 2)}
  for c in by_split["combos"]:
    assert any(pair not in seen for pair in itertools.combinations(c.pieces, 2)), c
  for split in tasks.SPLITS:  # generated tasks carry a composition of their split
    assert all(str(tasks.generate(split, i).composition) in sets[split] for i in range(50))


def test_tasks_as_a_corpus_source():
  train = sources.load_corpus("tasks", "train")
  assert len(train) == tasks.TRAIN_SIZE and train[3] == tasks.generate("train", 3).text
  assert train[-1] == tasks.generate("train", tasks.TRAIN_SIZE - 1).text
  assert len(sources.load_corpus("tasks:2000000000", "train")) == 2_000_000_000  # lazy
  assert len(sources.load_corpus("tasks", "combos")) == tasks.EVAL_SIZE
  assert sources.splits_of("tasks") == tasks.SPLITS
  with pytest.raises(ValueError, match="valid choices"):
    sources.load_corpus("tasks", "all")
  with pytest.raises(ValueError, match="tasks:N"):
    sources.load_corpus("tasks:many", "train")
  with pytest.raises(IndexError):
    sources.load_corpus("tasks:10", "train")[10]


def test_the_pipeline_streams_tasks_and_resumes_exactly():
  tok = tokenizer_lib.ByteTokenizer()
  texts = sources.load_corpus("tasks:100000", "train")
  make = lambda: pipeline.make_dataset(  # noqa: E731
    texts, tok, seq_len=128, batch_size=4, seed=3, shard_index=0, shard_count=1
  )
  reference = list(itertools.islice(iter(make()), 12))
  it = iter(make())
  for _ in range(5):
    next(it)
  resumed = iter(make())
  pipeline.restore_iterator_state(resumed, pipeline.iterator_state(it))
  for expected in reference[5:]:
    got = next(resumed)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
  decoded = tok.decode(reference[0]["tokens"][0])
  assert "def " in decoded or "assert " in decoded


def test_bpe_learns_from_the_first_max_bytes(tmp_path):
  seen = []

  def texts():
    for t in sources.load_corpus("tasks", "train"):
      seen.append(t)
      yield t

  tok = tokenizer_lib.get_or_build_tokenizer(tmp_path / "tok", "bpe", 300, texts, 20_000)
  assert 20_000 <= sum(map(len, seen)) < 20_000 + 1000 and tok.vocab_size == 300


# --- the suite ------------------------------------------------------------------------


class _FakeTokenizer:
  def encode(self, text):
    return list(text.encode())


def _fake_loaded(attention="causal"):
  config = types.SimpleNamespace(attention=attention, data=types.SimpleNamespace(seq_len=4096))
  return types.SimpleNamespace(config=config, tokenizer=_FakeTokenizer(), params=None)


def _fake_decoder(monkeypatch, body_for):
  """completions.decode returning body_for(task) for each prompt (with what follows a body
  in a document: blank lines and asserts, which the suite trims)."""
  by_prompt = {suite.prompt(tasks.generate(s, i)): tasks.generate(s, i) for s in suite.SPLITS
               for i in range(40)}  # fmt: skip

  def decode(loaded, prompts, settings, *, batch_size, seed):
    texts = ["\n" + body_for(by_prompt[p]) + "\n\nassert False\n" for p in prompts]
    return completions.Decoded(texts, [True] * len(texts), 1.0, 100.0, 0.1)

  monkeypatch.setattr(completions, "decode", decode)


@pytest.mark.parametrize(
  "body_for, expected",
  [
    (lambda t: t.body, 1.0),
    (lambda t: tasks.INDENT + "pass\n", 0.0),
    (lambda t: t.body + tasks.INDENT + "while True:\n" + 2 * tasks.INDENT + "pass\n", 1.0),
  ],
  ids=["reference", "pass", "dead_loop_after_return"],
)
def test_suite_scores_bodies(monkeypatch, body_for, expected):
  _fake_decoder(monkeypatch, body_for)
  rows = suite.rows(_fake_loaded(), num_tasks=40, grid={}, progress=lambda _: None)
  assert [(r["split"], r["metric"]) for r in rows] == [("test", "pass@1"), ("combos", "pass@1")]
  for r in rows:
    assert r["value"] == expected and r["n"] == 40 and r["sandbox_errors"] == 0
    assert r["tokens_per_forward"] == 1.0 and r["completion_entropy"] > 0


def test_timeouts_and_crashes_fail_and_never_stop_the_suite(monkeypatch):
  monkeypatch.setattr(suite, "TIMEOUT_S", 1.0)

  def body_for(t):
    index = int(t.name.split("/")[1])
    if index % 4 == 1:
      return tasks.INDENT + "while True:\n" + 2 * tasks.INDENT + "pass\n"
    if index % 4 == 2:
      return tasks.INDENT + "import os\n" + tasks.INDENT + "os.kill(os.getpid(), 9)\n"
    if index % 4 == 3:
      return tasks.INDENT + "raise RuntimeError('no')\n"
    return t.body

  _fake_decoder(monkeypatch, body_for)
  rows = suite.rows(_fake_loaded(), splits=("test",), num_tasks=12, grid={}, progress=print)
  (row,) = rows
  assert row["value"] == pytest.approx(0.25) and row["n"] == 12
  assert row["statuses"] == {"passed": 3, "timeout": 3, "killed": 3, "failed": 3}


def test_pass_at_k_over_samples_and_sandbox_errors_left_out():
  got = suite.pass_at_k_rows([[True, False], [False, False], [None, True], [None, None]], [1, 2])
  assert got[1][0] == pytest.approx((0.5 + 0 + 1) / 3) and got[1][2] == 3
  assert 2 not in got  # the third task has one verdict only


def test_infill_spans_rebuild_the_program():
  for t in (tasks.generate("test", i) for i in range(50)):
    (span,) = suite.infill_spans([t], seed=1)
    assert span.span.startswith("\n" + tasks.INDENT) and span.span.count("\n") == 1
    program = span.before + span.span + span.after
    assert program == t.text


def _main_job(workdir, *flags):
  """The main job on the testbed at tiny scale (configs/tiny.py:tasks, byte tokens)."""
  run = run_module(
    "sdiff_jax.main",
    "--config=configs/tiny.py:tasks",
    f"--workdir={workdir}",
    "--config.data.seq_len=512",
    "--config.train.num_steps=4",
    *flags,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  return run


@pytest.fixture(scope="module")
def tasks_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("tasks_run")
  return workdir, _main_job(workdir, "--report_tasks=4", "--steps_per_block=2").stdout


def test_main_job_prints_tasks_with_verdicts_and_pass_at_1(tasks_workdir):
  _, stdout = tasks_workdir
  shown = [line for line in stdout.splitlines() if line.startswith("----- test task test/")]
  assert len(shown) == 3 and all(line.endswith(("PASS", "FAIL")) for line in shown)
  (summary,) = [line for line in stdout.splitlines() if "pass@1 on" in line]
  assert "held-out test tasks" in summary and "2 steps per block" in summary
  assert "tokens per forward" in summary


def test_main_job_without_the_report(tasks_workdir):
  workdir, _ = tasks_workdir  # trained: the rerun resumes at its last step and stops
  run = _main_job(workdir, "--report_tasks=0")
  assert "pass@1" not in run.stdout and "error" not in run.stderr


def test_evaluate_cli_tasks_suites(tasks_workdir, tmp_path):
  workdir, _ = tasks_workdir
  out = tmp_path / "eval.json"
  run = run_module(
    "sdiff_jax.evaluate",
    f"--workdir={workdir}",
    "--suites=tasks,tasks_infill",
    "--tasks_num=3",
    "--tasks_splits=test,combos",
    "--steps_per_block=1,4",
    f"--json={out}",
  )
  assert run.returncode == 0, run.stderr[-3000:]
  rows = json.loads(out.read_text())["rows"]
  completed = [r for r in rows if r["suite"] == "tasks" and r["metric"] == "pass@1"]
  blocks = [r for r in rows if r["metric"] in ("block_accuracy", "correct_run", "ahead_accuracy")]
  assert [(r["split"], r["metric"]) for r in blocks] == [
    (s, m) for s in ("test", "combos") for m in ("block_accuracy", "correct_run", "ahead_accuracy")
  ]
  assert all(0 <= r["value"] <= r["block_size"] and r["n"] == 3 for r in blocks)
  assert len(blocks[0]["by_offset"]) == blocks[0]["block_size"]
  assert [(r["split"], r["steps_per_block"]) for r in completed] == [
    ("test", 1), ("test", 4), ("combos", 1), ("combos", 4)
  ]  # fmt: skip
  for r in completed:
    assert r["metric"] == "pass@1" and 0 <= r["value"] <= 1 and r["n"] == 3
    assert r["tokens_per_forward"] > 0 and r["tokens_per_s"] > 0 and "completion_entropy" in r
  filled = [r for r in rows if r["suite"] == "tasks_infill"]
  assert [(r["split"], r["steps"]) for r in filled] == [
    ("test", 1), ("test", 4), ("combos", 1), ("combos", 4)
  ]  # fmt: skip
  assert "| tasks | test: steps_per_block=4 | pass@1 |" in run.stdout


def test_leading_run_matches_a_loop():
  rng = np.random.default_rng(0)
  correct = rng.random((200, 12)) < 0.8
  scored = np.arange(12)[None] < rng.integers(0, 13, 200)[:, None]  # a body's tail unscored
  expected = [
    next((k for k in range(12) if s[k] and not c[k]), int(s.sum())) for c, s in zip(correct, scored)
  ]
  assert suite.leading_run(correct, scored).tolist() == expected


class _Oracle:
  """Stands in for an Objective: logits that put all mass on the clean token, except at
  the block's `wrong_offset`-th position (1-based; 0: none)."""

  mode = "bidirectional"

  def __init__(self, wrong_offset=0):
    self.wrong_offset = wrong_offset
    self.block_starts = []  # each row's first masked index

  def logits(self, params, noisy_BxL, batch):
    tokens_BxL = batch["tokens"]
    self.block_starts += np.argmax(np.asarray(noisy_BxL) == tokenizer_lib.MASK_ID, axis=1).tolist()
    if self.wrong_offset:
      masked_BxL = noisy_BxL == tokenizer_lib.MASK_ID
      offset_BxL = jnp.cumsum(masked_BxL, axis=1) * masked_BxL
      tokens_BxL = jnp.where(offset_BxL == self.wrong_offset, tokenizer_lib.EOS_ID, tokens_BxL)
    return jax.nn.one_hot(tokens_BxL, tokenizer_lib.BYTE_VOCAB_SIZE) * 30.0


@pytest.mark.parametrize(
  "wrong_offset, run, attention", [(0, 16, "bidirectional"), (3, 2, "block_causal")]
)
def test_block_rows_measure_what_one_forward_gets_right(wrong_offset, run, attention):
  config = tiny_config("tasks", attention=attention)  # block_size 16; every body is longer
  config.data.seq_len = 512
  loaded = inference.Loaded(config, tokenizer_lib.ByteTokenizer(), None)
  oracle = _Oracle(wrong_offset)
  rows = suite.block_rows(oracle, loaded, splits=("test",), num_tasks=5)
  # one forward per cut (the block's first 0, 4, 8, 12 tokens known); a block_causal
  # model's masked block is one of its training blocks
  starts_CxN = np.asarray(oracle.block_starts).reshape(4, 5)
  assert (starts_CxN[0] % 16 == 0).all() == (attention == "block_causal")
  assert (starts_CxN - starts_CxN[0] == np.arange(0, 16, 4)[:, None]).all()
  accuracy, correct_run, ahead = rows
  assert accuracy["metric"] == "block_accuracy" and correct_run["metric"] == "correct_run"
  assert correct_run["value"] == run and accuracy["n"] == 5
  assert accuracy["value"] == pytest.approx(1.0 if not wrong_offset else 15 / 16)
  assert accuracy["by_offset"] == [0.0 if k + 1 == wrong_offset else 1.0 for k in range(16)]
  # the oracle errs at the wrong_offset-th masked token: that distance, at every cut
  assert ahead["metric"] == "ahead_accuracy" and ahead["value"] == (
    0.0 if wrong_offset == 2 else 1.0
  )
  assert ahead["by_distance"] == [0.0 if d == wrong_offset else 1.0 for d in range(1, 17)]


def test_function_prompts_carry_the_documents_context_and_tests():
  from sdiff_jax.evaluate import validity  # pylint: disable=g-import-not-at-top

  helper = next(t for t in map(lambda i: tasks.generate("train", i), range(200)) if
                t.composition.filter == "prime")  # fmt: skip
  (item,) = validity.function_prompts([helper.text], 5)[-1:]
  assert item.prompt.startswith(f"def {helper.entry_point}(") and item.tests == helper.tests
  assert item.context.startswith("def is_prime(n):")
  assert validity.program(item, "\n" + helper.body, True).rstrip() == helper.text.rstrip()


def test_unit_test_verifier_runs_the_documents_asserts():
  from sdiff_jax import onpolicy  # pylint: disable=g-import-not-at-top
  from sdiff_jax.evaluate import validity  # pylint: disable=g-import-not-at-top

  task_list = [tasks.generate("train", i) for i in range(6)]
  items = [validity.function_prompts([t.text], 5)[-1] for t in task_list]
  right = ["\n" + t.body + "\n\nassert junk\n" for t in task_list]
  wrong = ["\n" + tasks.INDENT + "return None\n" for _ in task_list]
  verifier = onpolicy.UnitTests()
  assert verifier(items, right, [False] * 6).tolist() == [1.0] * 6
  assert verifier(items, wrong, [True] * 6).tolist() == [0.0] * 6
