"""The Colab quickstart notebook runs top to bottom through a real Jupyter kernel."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_executes(tmp_path, code_corpus_dir, monkeypatch):
  pytest.importorskip("matplotlib")
  nb = nbformat.read(os.path.join(REPO, "notebooks", "quickstart.ipynb"), as_version=4)
  workdir = tmp_path / "nb_workdir"
  for key, value in {
    "SDIFF_NB_TINY": "1",
    "SDIFF_NB_STEPS": "10",
    "SDIFF_NB_SOURCE": str(code_corpus_dir),
    "SDIFF_NB_WORKDIR": str(workdir),
    "SDIFF_JAX_CONFIGS": os.path.join(REPO, "configs"),
    "MPLBACKEND": "Agg",
    "XLA_FLAGS": "",
    "JAX_PLATFORMS": "cpu",
  }.items():
    monkeypatch.setenv(key, value)
  NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  ).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert "tokens per forward" in outputs and "block 0 step 1/" in outputs, outputs
  assert (workdir / "trajectory.png").stat().st_size > 1000
