r"""The sandbox under mixed hostile load: honest throughput and every hostile kind's verdicts.

    python -m sdiff_jax.bench.sandbox --programs=256 --hostile_fraction=0.25 --workers=4 \
        --timeout_s=2 --json=/tmp/sandbox.json

On-policy training with a unit-test verifier and functional suites run thousands of
model-written programs, a few of them runaway or hostile. This runs `programs` programs
through `sandbox.run_program` from `workers` threads in a seeded random order: honest ones
(a small function and its asserts, each different, all correct) and, for
`hostile_fraction` of them, the kinds of HOSTILE in turn. First the honest programs alone
(the same count and workers), then the mix, so both rates come from one run on one machine.

Reports (JSON rows and a summary line): for honest programs, their latency alone and in
the mix, whether any got a verdict other than `passed`, and two rates: `honest_per_s`,
honest programs / wall clock of the whole run (in the mix bounded by the hostile programs
that hold a worker until their timeout: `hostile_worker_s`), and `honest_capacity_per_s`,
workers / mean honest latency (the rate if every worker ran honest programs under this
load: how much the hostile ones slow the honest ones down). For each hostile kind, its
verdicts and whether each is one it should get. Exceptions are counted, not raised.
"""

import collections
import concurrent.futures
import json
import os
import random
import statistics
import sys
import time

from absl import app, flags

from sdiff_jax.evaluate import sandbox

# kind -> (program, the statuses it may end with). Every kind is bounded by itself too
# (sleeps of 20 s, 300 forks, a few GB), in case the sandbox failed to stop it.
HOSTILE = {
  # 300 sleeping children: more than max_processes, so the start limit is reached and
  # dozens are left to kill and reap
  "fork_storm": (
    "import os, time\n"
    "for _ in range(300):\n"
    "  try:\n"
    "    if os.fork() == 0:\n"
    "      time.sleep(20)\n"
    "      os._exit(0)\n"
    "  except OSError:\n"
    "    time.sleep(0.005)\n"
    "time.sleep(20)\n",
    ("timeout",),
  ),
  # every process forks and spins: max_processes busy processes until the timeout
  "fork_bomb": (
    "import os, time\n"
    "stop = time.monotonic() + 20\n"
    "while time.monotonic() < stop:\n"
    "  try:\n"
    "    os.fork()\n"
    "  except OSError:\n"
    "    pass\n",
    ("timeout", "killed"),
  ),
  # the same, each child in a session of its own (the scheduler's autogroups are per session)
  "session_bomb": (
    "import os, time\n"
    "stop = time.monotonic() + 20\n"
    "while time.monotonic() < stop:\n"
    "  try:\n"
    "    if os.fork() == 0:\n"
    "      os.setsid()\n"
    "  except OSError:\n"
    "    pass\n",
    ("timeout", "killed"),
  ),
  # MemoryError at memory_mb, after zeroing that much (over a second of CPU here)
  "memory_hog": (
    "chunks = []\nfor _ in range(256):\n  chunks.append(bytearray(16 << 20))\n",
    ("failed", "killed", "timeout"),
  ),
  "infinite_loop": ("while True:\n  pass\n", ("timeout", "killed")),
  "output_flood": (
    "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(200):\n  sys.stdout.write(chunk)\n",
    ("failed", "killed"),
  ),
  # SIGKILL to the evaluator and its process group: refused (the program then fails)
  "parent_killer": (
    "import os, signal\n"
    "os.kill(os.getppid(), signal.SIGKILL)\n"
    "os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)\n",
    ("failed",),
  ),
}

_PROGRAMS = flags.DEFINE_integer("programs", 256, "Programs in the mix.")
_HOSTILE_FRACTION = flags.DEFINE_float("hostile_fraction", 0.25, "Share of hostile programs.")
_KINDS = flags.DEFINE_list("kinds", list(HOSTILE), f"Hostile kinds, in turn: {list(HOSTILE)}.")
_WORKERS = flags.DEFINE_integer("workers", 4, "Threads calling sandbox.run_program.")
_TIMEOUT = flags.DEFINE_float("timeout_s", 2.0, "Wall-clock limit per program.")
_MEMORY = flags.DEFINE_integer("memory_mb", 1024, "Address-space limit per program, MiB.")
_SEED = flags.DEFINE_integer("seed", 0, "Order of the mix and the honest programs' values.")
_ALONE = flags.DEFINE_bool("alone", True, "First run the honest programs alone (the baseline).")
_JSON = flags.DEFINE_string("json", None, "Write the rows to this file as a JSON list.")


def honest_program(i: int) -> str:
  """A correct little program (a function and asserts on it), different for each i."""
  a, b = i % 7 + 2, i % 5 + 1
  return (
    f"def f(xs):\n"
    f"  return sorted(x * {a} + {b} for x in xs if x % 2 == {i % 2})\n"
    f"xs = list(range({i % 13 + 5}))\n"
    f"assert f(xs) == [x * {a} + {b} for x in xs if x % 2 == {i % 2}]\n"
    f"assert sum(range({i})) == {i * (i - 1) // 2}\n"
  )


def mix(programs: int, hostile_fraction: float, kinds: list[str], seed: int) -> list[tuple]:
  """(kind, source) for every program, shuffled; kind "honest" or one of `kinds`."""
  n_hostile = round(programs * hostile_fraction)
  jobs = [(kinds[i % len(kinds)], HOSTILE[kinds[i % len(kinds)]][0]) for i in range(n_hostile)]
  jobs += [("honest", honest_program(i)) for i in range(programs - n_hostile)]
  random.Random(seed).shuffle(jobs)
  return jobs


def run_jobs(jobs: list[tuple], workers: int, limits: dict, label: str) -> dict:
  """Runs `jobs` through the sandbox; per-kind verdicts and latencies, wall clock."""
  statuses = collections.defaultdict(collections.Counter)
  latency = collections.defaultdict(list)
  exceptions = collections.Counter()
  every = max(1, len(jobs) // 8)

  def one(job):
    kind, source = job
    start = time.monotonic()
    try:
      verdict = sandbox.run_program(source, **limits)
    except Exception as e:  # pylint: disable=broad-except
      return kind, f"exception {type(e).__name__}: {e}", time.monotonic() - start
    return kind, verdict.status, time.monotonic() - start

  start = time.monotonic()
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    for done, (kind, status, seconds) in enumerate(pool.map(one, jobs), 1):
      if status.startswith("exception"):
        exceptions[status] += 1
        status = "exception"
      statuses[kind][status] += 1
      latency[kind].append(seconds)
      if done % every == 0 or done == len(jobs):
        print(f"sandbox bench [{label}]: {done}/{len(jobs)}", file=sys.stderr, flush=True)
  return {
    "wall_s": time.monotonic() - start,
    "statuses": {kind: dict(counter) for kind, counter in statuses.items()},
    "latency": latency,
    "exceptions": dict(exceptions),
  }


def _latency_summary(seconds: list[float]) -> dict:
  ordered = sorted(seconds)
  return {
    "mean_s": statistics.fmean(ordered),
    "p50_s": ordered[len(ordered) // 2],
    "p95_s": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
    "max_s": ordered[-1],
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  unknown = sorted(set(_KINDS.value) - set(HOSTILE))
  if unknown:
    raise app.UsageError(f"unknown hostile kinds {unknown}; choose from {list(HOSTILE)}")
  if _WORKERS.value < 1 or round(_PROGRAMS.value * (1 - _HOSTILE_FRACTION.value)) < 1:
    raise app.UsageError("need workers >= 1 and at least one honest program")
  if not 0 <= _HOSTILE_FRACTION.value < 1:
    raise app.UsageError(f"need 0 <= hostile_fraction < 1, got {_HOSTILE_FRACTION.value}")
  limits = {"timeout_s": _TIMEOUT.value, "memory_mb": _MEMORY.value}
  jobs = mix(_PROGRAMS.value, _HOSTILE_FRACTION.value, _KINDS.value, _SEED.value)
  honest_jobs = [job for job in jobs if job[0] == "honest"]
  common = {
    "bench": "sandbox",
    "workers": _WORKERS.value,
    **limits,
    "protections": list(sandbox.protections().names()),
    "cpus": os.cpu_count(),
  }
  rows = []
  if _ALONE.value:
    alone = run_jobs(honest_jobs, _WORKERS.value, limits, "honest alone")
    rows.append(
      {
        **common,
        "run": "honest_alone",
        "programs": len(honest_jobs),
        "wall_s": alone["wall_s"],
        "honest_per_s": len(honest_jobs) / alone["wall_s"],
        "honest_capacity_per_s": _WORKERS.value / statistics.fmean(alone["latency"]["honest"]),
        "honest_latency": _latency_summary(alone["latency"]["honest"]),
        "honest_not_passed": len(honest_jobs) - alone["statuses"]["honest"].get("passed", 0),
        "statuses": alone["statuses"],
        "exceptions": alone["exceptions"],
      }
    )
  mixed = run_jobs(jobs, _WORKERS.value, limits, "mix")
  hostile = {}
  for kind in _KINDS.value:
    got = mixed["statuses"].get(kind, {})
    expected = HOSTILE[kind][1]
    hostile[kind] = {
      "statuses": got,
      "expected": list(expected),
      "unexpected": sum(n for status, n in got.items() if status not in expected),
      "mean_s": statistics.fmean(mixed["latency"][kind]) if mixed["latency"][kind] else None,
    }
  honest_statuses = mixed["statuses"].get("honest", {})
  rows.append(
    {
      **common,
      "run": "mix",
      "programs": len(jobs),
      "hostile": len(jobs) - len(honest_jobs),
      "hostile_fraction": _HOSTILE_FRACTION.value,
      "wall_s": mixed["wall_s"],
      "programs_per_s": len(jobs) / mixed["wall_s"],
      "honest_per_s": len(honest_jobs) / mixed["wall_s"],
      "honest_capacity_per_s": _WORKERS.value / statistics.fmean(mixed["latency"]["honest"]),
      "hostile_worker_s": sum(sum(mixed["latency"][kind]) for kind in _KINDS.value),
      "honest_latency": _latency_summary(mixed["latency"]["honest"]),
      "honest_not_passed": len(honest_jobs) - honest_statuses.get("passed", 0),
      "honest_statuses": honest_statuses,
      "hostile_kinds": hostile,
      "exceptions": mixed["exceptions"],
    }
  )
  for row in rows:
    print(
      f"{row['run']}: {row['programs']} programs, {row['wall_s']:.1f} s, honest "
      f"{row['honest_per_s']:.1f}/s of wall clock, capacity {row['honest_capacity_per_s']:.1f}/s "
      f"(mean latency {row['honest_latency']['mean_s'] * 1e3:.0f} ms), "
      f"{row['honest_not_passed']} honest not passed, {sum(row['exceptions'].values())} exceptions"
    )
  print(f"  hostile programs held workers for {rows[-1]['hostile_worker_s']:.1f} s in all")
  for kind, summary in hostile.items():
    print(f"  {kind:>14}: {summary['statuses']} (unexpected {summary['unexpected']})")
  print(json.dumps(rows))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(rows, f, indent=1)


def run():
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
