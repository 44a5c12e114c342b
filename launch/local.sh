#!/usr/bin/env bash
# Train a stage on this machine: its CPUs, or its GPUs / TPU chips if jax sees
# them. The same code path as a pod, with one process.
#
# usage: launch/local.sh [--fake-devices N] CONFIG WORKDIR [--config.x.y=v ...]
#   e.g. launch/local.sh configs/clip.py:demo workdirs/clip
#        launch/local.sh --fake-devices 8 configs/upsampler.py:tiny /tmp/up \
#            --config.mesh.shape='(2,2,2)'
#
# --fake-devices N splits the CPU into N jax devices (as the tests do), to try
# a mesh before booking accelerators.
set -euo pipefail

usage() {
  sed -n '5,6p' "$0" | sed 's/^# //' >&2
  exit 2
}

if [[ "${1:-}" == "--fake-devices" ]]; then
  [[ $# -ge 2 ]] || usage
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$2"
  export JAX_PLATFORMS=cpu
  shift 2
fi
[[ $# -ge 2 ]] || usage
config=$1 workdir=$2
shift 2

exec python -m unclip_jax.train --config "$config" --workdir "$workdir" "$@"
