"""Test setup: 8 simulated CPU devices, set before JAX is imported."""

import os
import pathlib

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from helpers import tiny_config, write_code_corpus  # noqa: E402,F401


@pytest.fixture(scope="session")
def code_corpus_dir(tmp_path_factory) -> pathlib.Path:
  return write_code_corpus(tmp_path_factory.mktemp("corpus"))
