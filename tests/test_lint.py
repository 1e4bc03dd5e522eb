"""The tree is formatted and lint-clean under the rules in pyproject.toml (ruff)."""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff(args):
  beside_python = os.path.join(os.path.dirname(sys.executable), "ruff")
  ruff = beside_python if os.path.exists(beside_python) else shutil.which("ruff")
  if ruff is None:
    pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
  run = subprocess.run([ruff, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stdout + run.stderr
