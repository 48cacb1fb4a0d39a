#!/usr/bin/env bash
# Print the TPU's state and the jrft run's state on one worker (running / exited N / died / not-started).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
usage: tpu/status.sh --name NAME --zone ZONE [--worker N] [--dry-run]

Prints two lines: 'tpu: STATE' (READY/ACTIVE/WAITING_FOR_RESOURCES/SUSPENDED/PREEMPTED/..., or 'missing')
and 'run: running | exited N | died | not-started' for worker N (default 0, the process that logs).

$COMMON_HELP
EOF
}

WORKER=0
while [[ $# -gt 0 ]]; do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case "$1" in
    --worker) WORKER=${2:?--worker needs a value}; shift 2 ;;
    *) parse_common "$@" || die "unknown option '$1' (see --help)"; shift "$CONSUMED" ;;
  esac
done
require_target

state=$(resource_state)
echo "tpu: ${state:-missing}"
if [[ -n $state || $DRY_RUN == 1 ]]; then
  echo "run: $(ssh_capture "$WORKER" "$(run_status_command)" || echo unreachable)"
fi
