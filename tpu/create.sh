#!/usr/bin/env bash
# Create a TPU VM (or a queued resource that becomes one) for jrft. See tpu/README.md.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
usage: tpu/create.sh --name NAME --accelerator TYPE [--zone ZONE] [--project P] [--queued]
                     [--spot | --preemptible] [--runtime-version V] [--wait] [--dry-run] [-- GCLOUD_ARGS...]

Creates a TPU VM with 'gcloud compute tpus tpu-vm create', or with --queued a queued resource
('gcloud compute tpus queued-resources create'), the recommended way to get spot and multi-host capacity.
Runtime version defaults per family: v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
v6e v2-alpha-tpuv6e.

Options:
  --spot               spot capacity (cheaper, preemptible at any time, no 24 h limit)
  --preemptible        legacy preemptible TPU VM (not with --queued; use --spot there)
  --runtime-version V  TPU software version (default: per family, above)
  --wait               return only once the TPU is READY / the queued resource ACTIVE
  --poll SECONDS       polling interval for --wait (default 30)
  -- GCLOUD_ARGS       extra flags passed to the gcloud create command (e.g. --network=...)

$COMMON_HELP
EOF
}

SPOT=0
PREEMPTIBLE=0
RUNTIME=""
WAIT=0
POLL=30
EXTRA=()
while [[ $# -gt 0 ]]; do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case "$1" in
    --spot) SPOT=1; shift ;;
    --preemptible) PREEMPTIBLE=1; shift ;;
    --runtime-version) RUNTIME=${2:?--runtime-version needs a value}; shift 2 ;;
    --wait) WAIT=1; shift ;;
    --poll) POLL=${2:?--poll needs a value}; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) parse_common "$@" || die "unknown option '$1' (see --help)"; shift "$CONSUMED" ;;
  esac
done

[[ -n $ACCELERATOR ]] || die "--accelerator is required (v4-8, v5e-16, v5p-8, v6e-8, ...)"
require_target
TYPE=$(accelerator_type "$ACCELERATOR")
FAMILY=$(tpu_family "$TYPE")
RUNTIME=${RUNTIME:-$(default_runtime "$FAMILY")}
if [[ $SPOT == 1 && $PREEMPTIBLE == 1 ]]; then
  die "--spot and --preemptible are exclusive"
fi
location_flags

if [[ $QUEUED == 1 ]]; then
  if [[ $PREEMPTIBLE == 1 ]]; then
    die "queued resources take --spot, not --preemptible"
  fi
  cmd=("$GCLOUD" compute tpus queued-resources create "$QR_ID" --node-id="$NAME" "${LOCATION[@]}"
    --accelerator-type="$TYPE" --runtime-version="$RUNTIME")
else
  cmd=("$GCLOUD" compute tpus tpu-vm create "$NAME" "${LOCATION[@]}"
    --accelerator-type="$TYPE" --version="$RUNTIME")
  if [[ $PREEMPTIBLE == 1 ]]; then
    cmd+=(--preemptible)
  fi
fi
if [[ $SPOT == 1 ]]; then
  cmd+=(--spot)
fi
run "${cmd[@]}" "${EXTRA[@]}"

if [[ $WAIT == 1 ]]; then
  wait_until_ready "$POLL"
fi
