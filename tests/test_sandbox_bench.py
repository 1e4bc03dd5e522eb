"""bench.sandbox end to end on a small mix: every verdict as it should be, JSON rows."""

import json
import subprocess
import sys


def test_sandbox_bench_mix(tmp_path):
  out = tmp_path / "sandbox.json"
  run = subprocess.run(
    [
      sys.executable,
      "-m",
      "sdiff_jax.bench.sandbox",
      "--programs=16",
      "--hostile_fraction=0.25",
      "--kinds=fork_storm,session_bomb,parent_killer,output_flood",
      "--workers=2",
      "--timeout_s=1",
      f"--json={out}",
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  alone, mix = json.loads(out.read_text())
  assert (alone["run"], alone["programs"]) == ("honest_alone", 12)
  assert (mix["run"], mix["programs"], mix["hostile"]) == ("mix", 16, 4)
  assert alone["honest_not_passed"] == mix["honest_not_passed"] == 0
  assert mix["honest_statuses"] == {"passed": 12} and mix["exceptions"] == {}
  kinds = {"fork_storm", "session_bomb", "parent_killer", "output_flood"}
  assert set(mix["hostile_kinds"]) == kinds
  for kind, summary in mix["hostile_kinds"].items():
    assert sum(summary["statuses"].values()) == 1 and summary["unexpected"] == 0, (kind, summary)
  assert mix["hostile_worker_s"] >= 2 * 1.0  # the storm and the bomb ran to their timeout
  assert mix["honest_per_s"] > 0 and mix["honest_capacity_per_s"] > 0
  assert "honest" in run.stdout and "parent_killer" in run.stdout
