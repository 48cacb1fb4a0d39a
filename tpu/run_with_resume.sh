#!/usr/bin/env bash
# Keep a jrft run going on spot / preemptible TPUs: (re)create the TPU when it is missing or preempted,
# reinstall, relaunch the same command, and let jrft resume from the latest checkpoint in its output_dir.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
usage: tpu/run_with_resume.sh --name NAME --accelerator TYPE [--queued] [--spot] [options]
                              -- OBJECTIVE CONFIG output_dir=gs://BUCKET/RUN [key=value ...]

Loop: if the TPU (or queued resource) is missing, FAILED, SUSPENDED or PREEMPTED, delete what is left and
create it again (tpu/create.sh), wait until it is READY/ACTIVE, install jrft (tpu/install.sh; on the first
pass too, so the workers run this checkout), launch the command on all workers (tpu/launch.sh), then poll
every --poll seconds until worker 0 reports that jrft exited. Exit 0 ends the loop; a preemption or a failed
run starts the loop again with the same command. jrft resumes from the newest checkpoint in output_dir, so
output_dir must outlive the VM: a GCS bucket (gs://...) or a persistent disk, never the VM's boot disk.

Loop options:
  --poll SECONDS        time between state checks (default 60)
  --max-restarts N      give up after N relaunches in all (default 20)
  --max-failures N      give up after N consecutive runs that exit non-zero without a preemption (default 3)
  --delete-when-done    delete the TPU after the run exits 0
  --no-install          skip tpu/install.sh on the first pass (it still runs on every recreated TPU)
Passed to tpu/create.sh:   --spot, --preemptible, --runtime-version V
Passed to tpu/install.sh:  --repo URL, --ref REF, --extras LIST, --pip PKG, --python PY
                           (--pip gcsfs is added when output_dir is on gs://: orbax needs it there)
Passed to tpu/launch.sh:   --env KEY=VALUE, --tmux

$COMMON_HELP
EOF
}

POLL=60
MAX_RESTARTS=20
MAX_FAILURES=3
DELETE_WHEN_DONE=0
INSTALL_FIRST=1
CREATE_OPTS=()
INSTALL_OPTS=()
LAUNCH_OPTS=()
JRFT_ARGS=()
while [[ $# -gt 0 ]]; do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case "$1" in
    --poll) POLL=${2:?--poll needs a value}; shift 2 ;;
    --max-restarts) MAX_RESTARTS=${2:?--max-restarts needs a value}; shift 2 ;;
    --max-failures) MAX_FAILURES=${2:?--max-failures needs a value}; shift 2 ;;
    --delete-when-done) DELETE_WHEN_DONE=1; shift ;;
    --no-install) INSTALL_FIRST=0; shift ;;
    --spot | --preemptible) CREATE_OPTS+=("$1"); shift ;;
    --runtime-version) CREATE_OPTS+=("$1" "${2:?$1 needs a value}"); shift 2 ;;
    --repo | --ref | --extras | --pip | --python) INSTALL_OPTS+=("$1" "${2:?$1 needs a value}"); shift 2 ;;
    --env) LAUNCH_OPTS+=("$1" "${2:?$1 needs a value}"); shift 2 ;;
    --tmux) LAUNCH_OPTS+=("$1"); shift ;;
    --) shift; JRFT_ARGS=("$@"); break ;;
    *) parse_common "$@" || die "unknown option '$1' (see --help)"; shift "$CONSUMED" ;;
  esac
done
[[ -n $ACCELERATOR ]] || die "--accelerator is required (the TPU may have to be recreated)"
require_target
[[ ${#JRFT_ARGS[@]} -ge 2 ]] || die "give the jrft command after --, e.g.: -- grpo configs/grpo.yaml output_dir=gs://b/r"
[[ $POLL =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--poll wants seconds, got '$POLL'"
for n in "$MAX_RESTARTS" "$MAX_FAILURES"; do
  [[ $n =~ ^[0-9]+$ ]] || die "--max-restarts/--max-failures want whole numbers, got '$n'"
done
if [[ " ${JRFT_ARGS[*]} " == *"output_dir=gs://"* ]]; then
  # orbax reaches gs:// through etils.epath -> fsspec, which needs gcsfs on the workers.
  if [[ " ${INSTALL_OPTS[*]} " != *" gcsfs "* ]]; then INSTALL_OPTS+=(--pip gcsfs); fi
else
  note "warning: no output_dir=gs://... in the command: checkpoints on the VM's disk do not survive a preemption"
fi
target_args

# Watch the launched run until it ends; sets OUTCOME to done | preempted | failed.
watch_run() {
  local state status
  while true; do
    sleep "$POLL"
    state=$(resource_state)
    if [[ $state != READY && $state != ACTIVE ]]; then
      note "$(resource_label) is ${state:-gone}: preempted"
      OUTCOME=preempted
      return
    fi
    status=$(ssh_capture 0 "$(run_status_command)" 2>/dev/null) || status=unreachable
    case "$status" in
      running | unreachable) ;;
      "exited 0") OUTCOME=finished; return ;;
      *) note "run on worker 0: $status"; OUTCOME=failed; return ;;
    esac
  done
}

# Every way round the loop again counts against --max-restarts, so no failure mode loops forever.
count_restart() {
  restarts=$((restarts + 1))
  if ((restarts > MAX_RESTARTS)); then
    die "$1; gave up after $MAX_RESTARTS restarts"
  fi
  note "$1 (restart $restarts of at most $MAX_RESTARTS)"
}

restarts=0
failures=0
need_install=$INSTALL_FIRST
while true; do
  state=$(resource_state)
  case "$state" in
    READY | ACTIVE) ;;
    "" | FAILED | SUSPENDING | SUSPENDED | PREEMPTED | TERMINATED | STOPPED)
      if [[ -n $state ]]; then
        note "$(resource_label) is $state: deleting it to create it again"
        "$TPU_DIR/delete.sh" "${TARGET[@]}" || true
      fi
      if ! "$TPU_DIR/create.sh" "${TARGET[@]}" "${CREATE_OPTS[@]}"; then
        count_restart "create failed"
        sleep "$POLL"
        continue
      fi
      need_install=1
      ;;
    *) ;;  # WAITING_FOR_RESOURCES, PROVISIONING, CREATING, ...: wait below
  esac
  if ! wait_until_ready "$POLL"; then
    count_restart "the TPU did not become ready"
    continue
  fi
  if [[ $need_install == 1 ]]; then
    "$TPU_DIR/install.sh" "${TARGET[@]}" "${INSTALL_OPTS[@]}"
    need_install=0
  fi
  "$TPU_DIR/launch.sh" "${TARGET[@]}" "${LAUNCH_OPTS[@]}" --skip-if-running -- "${JRFT_ARGS[@]}"
  if [[ $DRY_RUN == 1 ]]; then
    ssh_capture 0 "$(run_status_command)"
    note "dry run: would poll the TPU state and the status above every ${POLL}s, relaunching after preemption"
    exit 0
  fi

  watch_run
  case "$OUTCOME" in
    finished)
      note "jrft exited 0 after $restarts restart(s)"
      if [[ $DELETE_WHEN_DONE == 1 ]]; then
        "$TPU_DIR/delete.sh" "${TARGET[@]}"
      fi
      exit 0
      ;;
    preempted) failures=0 ;;
    failed)
      failures=$((failures + 1))
      if ((failures >= MAX_FAILURES)); then
        die "jrft failed $failures times in a row without a preemption; see tpu/logs.sh (giving up)"
      fi
      "$TPU_DIR/stop.sh" "${TARGET[@]}" || true
      ;;
  esac
  count_restart "relaunching"
done
