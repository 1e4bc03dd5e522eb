"""Test setup: 8 simulated CPU devices, set before JAX is imported.

The suite's tiny models spend most of their time in XLA's compiler: on the CPU backend
without LLVM's optimisations it compiles several times faster (the whole suite, 2 cores,
alone: 14m36s -> 10m36s). Subprocesses inherit the flags. A run that sets its own
optimisation level keeps it.
"""

import os
import pathlib

from helpers import FAST_COMPILE  # no JAX import

xla_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in xla_flags:
  xla_flags += " " + FAST_COMPILE
os.environ["XLA_FLAGS"] = (xla_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from helpers import tiny_config, write_code_corpus  # noqa: E402,F401


@pytest.fixture(scope="session")
def code_corpus_dir(tmp_path_factory) -> pathlib.Path:
  return write_code_corpus(tmp_path_factory.mktemp("corpus"))
