#!/usr/bin/env bash
# A Cloud TPU VM slice (one or many hosts): create it, install this checkout
# on every worker, train a stage on all workers at once, delete it.
#
# usage: launch/tpu_pod.sh create NAME ACCELERATOR [RUNTIME_VERSION]
#        launch/tpu_pod.sh setup  NAME
#        launch/tpu_pod.sh train  NAME CONFIG WORKDIR [--config.x.y=v ...]
#        launch/tpu_pod.sh delete NAME
#   e.g. launch/tpu_pod.sh create unclip v5p-256
#        launch/tpu_pod.sh setup unclip
#        launch/tpu_pod.sh train unclip configs/decoder.py:paper \
#            /mnt/runs/decoder --config.clip_workdir=/mnt/runs/clip
#
# Environment: ZONE (default us-east5-a), PROJECT (default: gcloud's),
# SPOT=1 (`create`: a preemptible slice), DETACH=1 (`train`: keep running
# after ssh closes, logging to ~/unclip-jax/train.log on each worker).
# WORKDIR must be a path every host mounts (Filestore NFS, or a bucket under
# gcsfuse): orbax writes each checkpoint from all hosts, and the data set must
# be readable there too (--config.data.data_dir).
# Every host runs the same command; jax.distributed starts itself from the
# TPU metadata (config.distributed.initialize="auto"), each host reads its
# own shard of the data, and only process 0 logs and writes files. Rerunning
# `train` resumes from the latest checkpoint in WORKDIR.
set -euo pipefail

ZONE=${ZONE:-us-east5-a}
REMOTE_DIR=unclip-jax

usage() {
  sed -n '5,8p' "$0" | sed 's/^# //' >&2
  exit 2
}

gcloud_tpu() {
  gcloud compute tpus tpu-vm "$@" --zone="$ZONE" \
      ${PROJECT:+--project="$PROJECT"}
}

on_all_workers() {  # NAME COMMAND
  gcloud_tpu ssh "$1" --worker=all --command="$2"
}

[[ $# -ge 2 ]] || usage
action=$1 name=$2
shift 2

case "$action" in
  create)
    [[ $# -ge 1 ]] || usage
    accelerator=$1
    # v5e is sold as v5litepod-N; the other kinds keep their names.
    accelerator=${accelerator/#v5e-/v5litepod-}
    runtime=${2:-}
    if [[ -z "$runtime" ]]; then
      case "$accelerator" in
        v4-*) runtime=tpu-ubuntu2204-base ;;
        v5litepod-*) runtime=v2-alpha-tpuv5-lite ;;
        v5p-*) runtime=v2-alpha-tpuv5 ;;
        v6e-*) runtime=v2-alpha-tpuv6e ;;
        *) echo "error: unknown accelerator $accelerator" >&2; exit 2 ;;
      esac
    fi
    gcloud_tpu create "$name" --accelerator-type="$accelerator" \
        --version="$runtime" ${SPOT:+--spot}
    ;;
  setup)
    # Copy this checkout (not its workdirs) to every worker and install it.
    repo=$(cd "$(dirname "$0")/.." && pwd)
    archive=$(mktemp -t unclip-jax.XXXXXX.tar.gz)
    trap 'rm -f "$archive"' EXIT
    tar -C "$repo" --exclude=.git --exclude=workdirs --exclude='*.whl' \
        -czf "$archive" .
    gcloud_tpu scp "$archive" "$name:unclip-jax.tar.gz" --worker=all
    on_all_workers "$name" "mkdir -p $REMOTE_DIR && \
        tar -C $REMOTE_DIR -xzf unclip-jax.tar.gz && \
        cd $REMOTE_DIR && python3 -m pip install -q -e '.[tpu]'"
    ;;
  train)
    [[ $# -ge 2 ]] || usage
    config=$1 workdir=$2
    shift 2
    overrides=""
    for arg in "$@"; do overrides+=" $(printf '%q' "$arg")"; done
    command="python3 -m unclip_jax.train --config $(printf '%q' "$config") \
        --workdir $(printf '%q' "$workdir")$overrides"
    if [[ -n "${DETACH:-}" ]]; then
      # Survives a dropped ssh session; each worker logs to its train.log.
      command="nohup $command > train.log 2>&1 &"
    fi
    # One process per host; without DETACH every worker's output comes back.
    on_all_workers "$name" "cd $REMOTE_DIR && $command"
    ;;
  delete)
    gcloud_tpu delete "$name" --quiet
    ;;
  *)
    usage
    ;;
esac
