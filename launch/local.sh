#!/usr/bin/env bash
# One host, any number of local devices (CPU, GPUs or a single TPU VM).
#   launch/local.sh CONFIG WORKDIR [extra flags...]
#   DRY_RUN=1 launch/local.sh configs/quickstart.py /tmp/run   # print, don't run
#   NUM_CPU_DEVICES=8 launch/local.sh ...                      # simulate 8 CPU devices
set -euo pipefail
CONFIG=${1:?usage: launch/local.sh CONFIG WORKDIR [flags...] (CONFIG missing)}
WORKDIR=${2:?usage: launch/local.sh CONFIG WORKDIR [flags...] (WORKDIR missing)}
shift 2
if [[ -n "${NUM_CPU_DEVICES:-}" ]]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${NUM_CPU_DEVICES}"
fi
# XLA takes 75% of GPU memory by default; the large configs are sized for 92%
# of an 80 GB H100 (tests/test_large_configs.py).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
cmd=(python -m sdiff_jax.main "--config=${CONFIG}" "--workdir=${WORKDIR}" "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
  echo "XLA_FLAGS=${XLA_FLAGS:-} XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION} ${cmd[*]}"
  exit 0
fi
exec "${cmd[@]}"
