#!/usr/bin/env bash
# TPU VM pod slice: run the same command on every worker; JAX finds its peers itself.
#   TPU_NAME=my-v5p ZONE=us-east5-a launch/tpu_pod.sh CONFIG WORKDIR [flags...]
#   DRY_RUN=1 TPU_NAME=x ZONE=y launch/tpu_pod.sh configs/8b.py:tpu_v5p gs://bucket/run
# The repository must be installed on every worker (pip install -e .); WORKDIR
# should be a gs:// path or a shared filesystem.
set -euo pipefail
CONFIG=${1:?usage: tpu_pod.sh CONFIG WORKDIR [flags...] (CONFIG missing)}
WORKDIR=${2:?usage: tpu_pod.sh CONFIG WORKDIR [flags...] (WORKDIR missing)}
shift 2
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU VM zone}"
remote="cd ${REPO_DIR:-~/sdiff_jax} && python -m sdiff_jax.main --config=${CONFIG} --workdir=${WORKDIR} $*"
cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$remote")
if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
