"""Two real CPU processes (jax.distributed, gloo) train, checkpoint and restore like one."""

import os
import subprocess
import sys

import numpy as np
import portpicker

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers", "distributed_train.py")


def _launch(out_dir, num_processes, devices_per_process):
  port = str(portpicker.pick_unused_port())
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
  }
  procs = [
    subprocess.Popen(
      [sys.executable, WORKER, str(out_dir), str(num_processes), str(i), port],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(num_processes)
  ]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  return np.load(os.path.join(out_dir, "result.npz")), outs


def test_two_processes_match_one(tmp_path):
  two, outs = _launch(tmp_path / "two", num_processes=2, devices_per_process=1)
  assert "process 1/2 devices 2" in outs[1], outs[1]
  one, _ = _launch(tmp_path / "one", num_processes=1, devices_per_process=2)
  # Same global batches, same 2-device mesh: only the collectives' transport differs.
  np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
  assert set(two.files) == set(one.files)
  for name in one.files:
    np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-6, err_msg=name)
