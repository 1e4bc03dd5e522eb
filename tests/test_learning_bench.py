"""bench.learning end to end on the tiny config: JSON rows for every mode and eval step, a PNG."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_learning_bench_writes_curves(tmp_path, code_corpus_dir):
  out_json, out_png = tmp_path / "learning.json", tmp_path / "learning.png"
  run = subprocess.run(
    [
      sys.executable,
      "-m",
      "sdiff_jax.bench.learning",
      f"--config=configs/tiny.py:{code_corpus_dir}",
      "--steps=4",
      "--eval_steps=2,4",
      "--modes=causal,bidirectional+shift+ar=0.5",
      "--heldout_rows=4",
      "--repeats=2",
      f"--workdir={tmp_path / 'work'}",
      f"--json={out_json}",
      f"--png={out_png}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg"},
  )
  assert run.returncode == 0, run.stdout + run.stderr
  result = json.loads(out_json.read_text())
  rows = [(r["mode"], r["step"], r["stage"]) for r in result["rows"]]
  assert rows == [
    ("causal", 2, "ar"),
    ("causal", 4, "ar"),
    ("bidirectional+shift+ar=0.5", 2, "ar"),
    ("bidirectional+shift+ar=0.5", 4, "mask+edit"),
  ]
  for r in result["rows"]:
    assert 0 < r["bits"] < 12 and r["stderr"] > 0 and r["heldout_rows"] == 4
  assert 0 < result["unigram_bits"] < 9  # byte-level unigram of a tiny code corpus
  assert out_png.stat().st_size > 1000
