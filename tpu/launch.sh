#!/usr/bin/env bash
# Launch `jrft OBJECTIVE CONFIG key=value...` on every worker of a TPU VM, detached (nohup or tmux), with its
# output in a log file on each worker. See tpu/README.md.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
usage: tpu/launch.sh --name NAME --zone ZONE [--env KEY=VALUE]... [--tmux] [--skip-if-running] [--dry-run]
                     -- OBJECTIVE CONFIG [key=value ...]

Starts '.venv/bin/jrft OBJECTIVE CONFIG key=value ...' in ~/REMOTE_DIR on all workers at once (one process
per worker; JAX joins them through jax.distributed, auto-detected on TPU VMs). CONFIG is a path inside the
remote checkout (e.g. configs/grpo.yaml). Each worker writes the log to REMOTE_DIR/LOG, the process group id
to LOG.pid and, when jrft ends, its exit status to LOG.exit. Put output_dir on GCS (output_dir=gs://...)
or a persistent disk so checkpoints outlive the VM; tpu/run_with_resume.sh relies on that.

Environment set for the run: JRFT_DISTRIBUTED=tpu (initialise jax.distributed from the TPU metadata, fail
loudly if it is not found), PYTHONUNBUFFERED=1 (log lines appear as they are written), plus --env values.

Options:
  --env KEY=VALUE      extra environment variable for the run, repeatable
  --tmux               run in a detached tmux session 'jrft' instead of under nohup (attach to watch it)
  --skip-if-running    exit 0 without launching where the run is already alive (default: fail there)

$COMMON_HELP
EOF
}

ENVS=(JRFT_DISTRIBUTED=tpu PYTHONUNBUFFERED=1)
TMUX_MODE=0
IF_RUNNING="fail"
JRFT_ARGS=()
while [[ $# -gt 0 ]]; do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case "$1" in
    --env) ENVS+=("${2:?--env needs KEY=VALUE}"); shift 2 ;;
    --tmux) TMUX_MODE=1; shift ;;
    --skip-if-running) IF_RUNNING="skip"; shift ;;
    --) shift; JRFT_ARGS=("$@"); break ;;
    *) parse_common "$@" || die "unknown option '$1' (see --help)"; shift "$CONSUMED" ;;
  esac
done
require_target
[[ ${#JRFT_ARGS[@]} -ge 2 ]] || die "give the jrft command after --, e.g.: -- grpo configs/grpo.yaml steps=100"
for kv in "${ENVS[@]}"; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants KEY=VALUE, got '$kv'"
done

log=$RUN_LOG
pid_file="$log.pid"
exit_file="$log.exit"
# The job: jrft, then its exit status into LOG.exit (what tpu/status.sh and run_with_resume.sh read).
job="$(quote_cmd .venv/bin/jrft "${JRFT_ARGS[@]}"); echo \$? > $exit_file"
started="echo \"launched on \$(hostname): pid \$(cat $pid_file), log ~/$REMOTE_DIR/$log\""

remote="set -e; cd ~/$REMOTE_DIR; mkdir -p $(dirname "$log"); "
remote+="if [ -f $pid_file ] && kill -0 \"\$(cat $pid_file)\" 2>/dev/null; then "
if [[ $IF_RUNNING == skip ]]; then
  remote+="echo \"jrft already running on \$(hostname); not relaunched\"; exit 0; fi; "
else
  remote+="echo \"jrft already running on \$(hostname) (tpu/stop.sh stops it)\" >&2; exit 1; fi; "
fi
remote+="rm -f $exit_file; "
if [[ $TMUX_MODE == 1 ]]; then
  # A tmux pane leads its own process group, so its pid doubles as the group id for tpu/stop.sh.
  inner="$(quote_cmd env "${ENVS[@]}" bash -c "$job") >> $log 2>&1"
  remote+="tmux new-session -d -s jrft $(shq "$inner"); "
  remote+="tmux display-message -p -t jrft '#{pane_pid}' > $pid_file; $started"
else
  # setsid: the job leads a new process group (kill -- -PID stops jrft and its children) and survives ssh.
  remote+="setsid nohup $(quote_cmd env "${ENVS[@]}" bash -c "$job") >> $log 2>&1 < /dev/null & "
  remote+="echo \$! > $pid_file; $started"
fi
ssh_workers all "$remote"
