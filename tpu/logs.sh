#!/usr/bin/env bash
# Stream the run's log from a worker (default 0) or from all workers.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
usage: tpu/logs.sh --name NAME --zone ZONE [--worker N|all] [--lines N] [--no-follow] [--dry-run]

Runs 'tail -F' on REMOTE_DIR/LOG over ssh (Ctrl-C stops watching, not the run). Worker 0 holds the
metrics (only process 0 logs them); other workers show their own warnings and errors.

Options:
  --worker N|all   which worker (default 0)
  --lines N        lines of history to show first (default 100)
  --no-follow      print the last lines and return

$COMMON_HELP
EOF
}

WORKER=0
LINES=100
FOLLOW=1
while [[ $# -gt 0 ]]; do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case "$1" in
    --worker) WORKER=${2:?--worker needs a value}; shift 2 ;;
    --lines) LINES=${2:?--lines needs a value}; shift 2 ;;
    --no-follow) FOLLOW=0; shift ;;
    *) parse_common "$@" || die "unknown option '$1' (see --help)"; shift "$CONSUMED" ;;
  esac
done
require_target
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines wants a number, got '$LINES'"
[[ $WORKER =~ ^([0-9]+|all)$ ]] || die "--worker wants a number or 'all', got '$WORKER'"

if [[ $FOLLOW == 1 ]]; then
  ssh_workers "$WORKER" "tail -n $LINES -F ~/$REMOTE_DIR/$RUN_LOG"
else
  ssh_workers "$WORKER" "tail -n $LINES ~/$REMOTE_DIR/$RUN_LOG"
fi
