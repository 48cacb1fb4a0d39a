#!/usr/bin/env bash
# Stop the jrft run started by tpu/launch.sh on every worker (by the process group id in LOG.pid).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
usage: tpu/stop.sh --name NAME --zone ZONE [--dry-run]

Sends SIGTERM to the process group recorded in LOG.pid on every worker, waits up to 30 s, then SIGKILL.
Only that run is touched; nothing is killed by name.

$COMMON_HELP
EOF
}

while [[ $# -gt 0 ]]; do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  parse_common "$@" || die "unknown option '$1' (see --help)"
  shift "$CONSUMED"
done
require_target

pid_file="$RUN_LOG.pid"
remote="cd ~/$REMOTE_DIR 2>/dev/null || exit 0; [ -f $pid_file ] || exit 0; pid=\$(cat $pid_file); "
remote+="kill -TERM -- -\$pid 2>/dev/null || true; "
remote+="for _ in \$(seq 30); do kill -0 -- -\$pid 2>/dev/null || break; sleep 1; done; "
remote+="kill -KILL -- -\$pid 2>/dev/null || true; rm -f $pid_file; echo \"stopped on \$(hostname)\""
ssh_workers all "$remote"
