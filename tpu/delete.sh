#!/usr/bin/env bash
# Delete the TPU VM, or with --queued the queued resource and its TPU VM.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
usage: tpu/delete.sh --name NAME --zone ZONE [--queued] [--async] [--dry-run]

Deletes without asking (--quiet). Checkpoints under output_dir on GCS or a persistent disk survive; files on
the VM's own disk (logs, a local output_dir) are lost: copy them first (tpu/logs.sh --no-follow, gcloud scp).

Options:
  --async    return at once instead of waiting for the deletion to finish

$COMMON_HELP
EOF
}

ASYNC=()
while [[ $# -gt 0 ]]; do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case "$1" in
    --async) ASYNC=(--async); shift ;;
    *) parse_common "$@" || die "unknown option '$1' (see --help)"; shift "$CONSUMED" ;;
  esac
done
require_target
location_flags

if [[ $QUEUED == 1 ]]; then
  # --force also deletes the TPU VM the queued resource holds.
  run "$GCLOUD" compute tpus queued-resources delete "$QR_ID" "${LOCATION[@]}" --force --quiet "${ASYNC[@]}"
else
  run "$GCLOUD" compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet "${ASYNC[@]}"
fi
