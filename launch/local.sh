#!/usr/bin/env bash
# Train a stage on this machine: its CPUs, or its GPUs / TPU chips if jax sees
# them. The same code path as a pod.
#
# usage: launch/local.sh [--fake-devices N] [--processes P] CONFIG WORKDIR [--config.x.y=v ...]
#   e.g. launch/local.sh configs/clip.py:demo workdirs/clip
#        launch/local.sh --fake-devices 8 configs/upsampler.py:tiny /tmp/up \
#            --config.mesh.shape='(2,2,2)'
#        launch/local.sh --fake-devices 4 --processes 2 configs/clip.py:tiny \
#            /tmp/clip --config.mesh.shape='(2,4,1)'
#
# --fake-devices N splits the CPU into N jax devices (as the tests do), to try
# a mesh before booking accelerators. --processes P runs P processes joined by
# jax.distributed over localhost, as the hosts of a pod are: each reads its own
# shard of the data and saves its own shards of the checkpoint; process 0 logs
# here, the others to files named at start. SIGTERM to this script (or to any
# one process) is a preemption notice: all save at the same step and exit 143;
# the same command resumes.
set -euo pipefail

usage() {
  sed -n '5,5p' "$0" | sed 's/^# //' >&2
  exit 2
}

processes=1
while [[ "${1:-}" == --fake-devices || "${1:-}" == --processes ]]; do
  [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || usage
  if [[ "$1" == --fake-devices ]]; then
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$2"
    export JAX_PLATFORMS=cpu
  else
    processes=$2
  fi
  shift 2
done
[[ $# -ge 2 ]] || usage
config=$1 workdir=$2
shift 2
train=(python -m unclip_jax.train --config "$config" --workdir "$workdir" "$@")

if (( processes == 1 )); then
  exec "${train[@]}"
fi

port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES=$processes
logs=$(mktemp -d "${TMPDIR:-/tmp}/unclip_local.XXXXXX")
pids=()
any_alive() {
  local pid
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && return 0; done
  return 1
}
stop_all() {  # no process outlives the job
  kill -TERM "${pids[@]}" 2>/dev/null || true
  # SIGTERM is a preemption notice: the survivors save at an agreed step and
  # exit. Without the coordinator (process 0) they cannot agree: kill them.
  for _ in $(seq 30); do
    any_alive || return 0
    sleep 1
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
}
trap stop_all EXIT
trap "exit 143" TERM  # a preemption notice for the job: pass it on (stop_all)
for ((index = 1; index < processes; index++)); do
  echo "process $index of $processes: log in $logs/process_$index.log" >&2
  JAX_PROCESS_ID=$index "${train[@]}" > "$logs/process_$index.log" 2>&1 &
  pids+=($!)
done
# Gloo (jax's CPU collectives between processes) prints "[Gloo] Rank r is
# connected to n peer ranks ..." on stdout for every group it connects: muted
# here, kept in the other processes' logs.
JAX_PROCESS_ID=0 "${train[@]}" > >(grep --line-buffered -v '^\[Gloo\] Rank ') &
pids+=($!)
# The first process to fail ends the job: the others would wait for it forever.
for _ in "${pids[@]}"; do
  status=0
  wait -n || status=$?
  if (( status != 0 )); then
    echo "a process exited $status; stopping the others (logs in $logs)" >&2
    exit "$status"
  fi
done
