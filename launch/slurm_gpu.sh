#!/usr/bin/env bash
# Multi-node GPU training under Slurm: one process per node, all its GPUs local.
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 launch/slurm_gpu.sh CONFIG WORKDIR [flags...]
#   DRY_RUN=1 SLURM_JOB_NODELIST=node[1-2] SLURM_NNODES=2 SLURM_PROCID=0 launch/slurm_gpu.sh ...
# The coordinator is the first node of the allocation (port COORDINATOR_PORT,
# default 12355). WORKDIR must be on a filesystem every node sees.
#SBATCH --job-name=sdiff_jax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
CONFIG=${1:?usage: slurm_gpu.sh CONFIG WORKDIR [flags...] (CONFIG missing)}
WORKDIR=${2:?usage: slurm_gpu.sh CONFIG WORKDIR [flags...] (WORKDIR missing)}
shift 2
: "${SLURM_JOB_NODELIST:?not inside a Slurm allocation (SLURM_JOB_NODELIST unset): submit with sbatch}"
: "${SLURM_NNODES:?SLURM_NNODES unset}"
if command -v scontrol >/dev/null; then
  head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
else
  head_node=$(echo "$SLURM_JOB_NODELIST" | sed -E 's/\[([0-9]+).*\]/\1/; s/,.*//')
fi
coordinator="${head_node}:${COORDINATOR_PORT:-12355}"
# XLA takes 75% of GPU memory by default; the large configs are sized for 92%
# of an 80 GB H100 (tests/test_large_configs.py).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
cmd=(python -m sdiff_jax.main "--config=${CONFIG}" "--workdir=${WORKDIR}"
     "--coordinator_address=${coordinator}" "--num_processes=${SLURM_NNODES}" "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
  echo "srun --ntasks-per-node=1 bash -c '${cmd[*]} --process_id=\$SLURM_PROCID'"
  exit 0
fi
exec srun --ntasks-per-node=1 bash -c "${cmd[*]} --process_id=\$SLURM_PROCID"
