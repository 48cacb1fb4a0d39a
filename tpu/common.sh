# shellcheck shell=bash disable=SC2034  # (the variables set here are read by the scripts that source it)
# Shared by the tpu/*.sh scripts (sourced, never run): option parsing, per-accelerator defaults, and the
# dry-run-aware command runner. Every gcloud/ssh/scp/tar command goes through `run` or `capture`, so
# `--dry-run` prints the exact command lines (one per line, shell-quoted, prefixed with "[dry-run] ")
# instead of running them.

# Dry-run lines go to fd 3 (the script's stdout), so they still show when a command runs inside $(...).
exec 3>&1

TPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$TPU_DIR/.." && pwd)"

# Options shared by every script; each may also come from the environment (flags win).
NAME="${JRFT_TPU_NAME:-}"                # TPU VM (node) name
QR_ID="${JRFT_TPU_QR_ID:-}"              # queued-resource id (default: the node name)
ZONE="${JRFT_TPU_ZONE:-}"                # default: per accelerator family, see default_zone
PROJECT="${JRFT_TPU_PROJECT:-}"          # default: gcloud's configured project
ACCELERATOR="${JRFT_TPU_ACCELERATOR:-}"  # v4-8, v5e-16 (= v5litepod-16), v5p-8, v6e-8, ...
QUEUED="${JRFT_TPU_QUEUED:-0}"           # 1: the TPU is managed as a queued resource
REMOTE_DIR="${JRFT_TPU_REMOTE_DIR:-jrft}"  # jrft checkout on every worker, relative to the remote $HOME
RUN_LOG="${JRFT_TPU_LOG:-logs/jrft.log}"   # the run's log on every worker, relative to REMOTE_DIR
GCLOUD="${JRFT_GCLOUD:-gcloud}"
DRY_RUN=0
CONSUMED=0

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

note() {
  echo "$(basename "$0"): $*" >&2
}

# Quote one word for a POSIX shell; words made only of safe characters stay bare (readable dry-run output).
shq() {
  local s=$1 q="'\\''"
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/$q}"
  fi
}

quote_cmd() {
  local out=() w
  for w in "$@"; do
    out+=("$(shq "$w")")
  done
  printf '%s' "${out[*]}"
}

# Run a command, or print it under --dry-run.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '[dry-run] %s\n' "$(quote_cmd "$@")" >&3
    return 0
  fi
  printf '+ %s\n' "$(quote_cmd "$@")" >&2
  "$@"
}

# Run a command whose stdout the caller reads; under --dry-run print it and output nothing.
capture() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '[dry-run] %s\n' "$(quote_cmd "$@")" >&3
    return 0
  fi
  "$@"
}

# Parse one shared option at "$@"; sets CONSUMED to the number of words used, returns 1 if not ours.
# Callers split --opt=value into two words first.
parse_common() {
  CONSUMED=1
  case "$1" in
    --name) NAME=${2:?--name needs a value}; CONSUMED=2 ;;
    --qr-id) QR_ID=${2:?--qr-id needs a value}; CONSUMED=2 ;;
    --zone) ZONE=${2:?--zone needs a value}; CONSUMED=2 ;;
    --project) PROJECT=${2:?--project needs a value}; CONSUMED=2 ;;
    --accelerator) ACCELERATOR=${2:?--accelerator needs a value}; CONSUMED=2 ;;
    --remote-dir) REMOTE_DIR=${2:?--remote-dir needs a value}; CONSUMED=2 ;;
    --log) RUN_LOG=${2:?--log needs a value}; CONSUMED=2 ;;
    --queued) QUEUED=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) return 1 ;;
  esac
}

COMMON_HELP="Shared options (also read from JRFT_TPU_NAME, JRFT_TPU_ZONE, JRFT_TPU_PROJECT, ...):
  --name NAME          TPU VM (node) name                                   [\$JRFT_TPU_NAME]
  --zone ZONE          zone; default from --accelerator (v4 us-central2-b, v5e us-west4-a,
                       v5p us-east5-a, v6e us-east5-b)                       [\$JRFT_TPU_ZONE]
  --project PROJECT    GCP project; default: gcloud's configured project     [\$JRFT_TPU_PROJECT]
  --accelerator TYPE   v4-8, v5e-16 (= v5litepod-16), v5p-8, v6e-8, ...      [\$JRFT_TPU_ACCELERATOR]
  --queued             the TPU is (to be) a queued resource                  [\$JRFT_TPU_QUEUED=1]
  --qr-id ID           queued-resource id (default: NAME)                    [\$JRFT_TPU_QR_ID]
  --remote-dir DIR     jrft checkout on each worker, under \$HOME (default: jrft)
  --log FILE           the run's log on each worker, under DIR (default: logs/jrft.log); the launcher
                       also writes FILE.pid (process group id) and FILE.exit (exit status) beside it
  --dry-run            print every gcloud/ssh command instead of running it
  -h, --help           this help"

# ------------------------------------------------------------------------------ accelerator tables

# v5e-N -> v5litepod-N (gcloud's name); other families keep their names. Dies on an unknown family.
accelerator_type() {
  local acc=$1
  case "$acc" in
    v5e-[0-9]*) echo "v5litepod-${acc#v5e-}" ;;
    v4-[0-9]* | v5p-[0-9]* | v6e-[0-9]* | v5litepod-[0-9]*) echo "$acc" ;;
    *) die "unknown accelerator '$acc' (expected v4-N, v5e-N / v5litepod-N, v5p-N or v6e-N)" ;;
  esac
}

tpu_family() {
  case "$1" in
    v4-*) echo v4 ;;
    v5e-* | v5litepod-*) echo v5e ;;
    v5p-*) echo v5p ;;
    v6e-*) echo v6e ;;
    *) die "unknown accelerator '$1'" ;;
  esac
}

# Runtime (software) versions recommended for JAX per family (cloud.google.com/tpu/docs/runtimes).
default_runtime() {
  case "$1" in
    v4) echo tpu-ubuntu2204-base ;;
    v5e) echo v2-alpha-tpuv5-lite ;;
    v5p) echo v2-alpha-tpuv5 ;;
    v6e) echo v2-alpha-tpuv6e ;;
  esac
}

# One zone that offers each family (cloud.google.com/tpu/docs/regions-zones); pass --zone for others.
default_zone() {
  case "$1" in
    v4) echo us-central2-b ;;
    v5e) echo us-west4-a ;;
    v5p) echo us-east5-a ;;
    v6e) echo us-east5-b ;;
  esac
}

# Fill ZONE/QR_ID defaults and check what every remote command needs.
require_target() {
  [[ -n $NAME ]] || die "--name is required (or set JRFT_TPU_NAME)"
  if [[ -z $ZONE && -n $ACCELERATOR ]]; then
    ZONE=$(default_zone "$(tpu_family "$ACCELERATOR")")
  fi
  [[ -n $ZONE ]] || die "--zone is required (or give --accelerator to use its default zone)"
  [[ -n $QR_ID ]] || QR_ID=$NAME
  [[ $REMOTE_DIR =~ ^[A-Za-z0-9_./-]+$ ]] || die "--remote-dir must be a plain relative path, got '$REMOTE_DIR'"
  [[ $RUN_LOG =~ ^[A-Za-z0-9_./-]+$ ]] || die "--log must be a plain relative path, got '$RUN_LOG'"
}

# The options that name the same TPU and run, to pass on to another tpu/ script.
target_args() {
  TARGET=(--name "$NAME" --qr-id "$QR_ID" --zone "$ZONE" --remote-dir "$REMOTE_DIR" --log "$RUN_LOG")
  if [[ -n $PROJECT ]]; then TARGET+=(--project "$PROJECT"); fi
  if [[ -n $ACCELERATOR ]]; then TARGET+=(--accelerator "$ACCELERATOR"); fi
  if [[ $QUEUED == 1 ]]; then TARGET+=(--queued); fi
  if [[ $DRY_RUN == 1 ]]; then TARGET+=(--dry-run); fi
}

# Remote shell snippet: print the run's state on a worker: "running", "exited N", "died" (no exit status:
# killed with its VM) or "not-started".
run_status_command() {
  local pid="$RUN_LOG.pid" ex="$RUN_LOG.exit"
  printf '%s' "cd ~/$REMOTE_DIR 2>/dev/null || { echo not-started; exit 0; }; " \
    "if [ -f $ex ]; then echo \"exited \$(cat $ex)\"; " \
    "elif [ -f $pid ] && kill -0 \"\$(cat $pid)\" 2>/dev/null; then echo running; " \
    "elif [ -f $pid ]; then echo died; else echo not-started; fi"
}

# --zone/--project flags for gcloud, as an array: "${LOCATION[@]}".
location_flags() {
  LOCATION=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then
    LOCATION+=(--project="$PROJECT")
  fi
}

# Run COMMAND (a string for the remote login shell) on WORKER ("all" or an index) of the TPU VM.
ssh_workers() {
  local worker=$1 command=$2
  location_flags
  run "$GCLOUD" compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker="$worker" --command="$command"
}

# Like ssh_workers, but returns the remote output (nothing under --dry-run).
ssh_capture() {
  local worker=$1 command=$2
  location_flags
  capture "$GCLOUD" compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker="$worker" --command="$command"
}

# The state of the queued resource (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...) or of the TPU VM (READY,
# PREEMPTED, ...); empty when it does not exist (or under --dry-run).
resource_state() {
  location_flags
  if [[ $QUEUED == 1 ]]; then
    capture "$GCLOUD" compute tpus queued-resources describe "$QR_ID" "${LOCATION[@]}" \
      --format='value(state.state)' 2>/dev/null || true
  else
    capture "$GCLOUD" compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" --format='value(state)' \
      2>/dev/null || true
  fi
}

# Poll every POLL seconds until the TPU VM is READY / the queued resource ACTIVE (queued resources can wait
# hours for capacity). Returns 1 if it fails, is suspended/preempted, or does not exist.
wait_until_ready() {
  local poll=$1 state
  while true; do
    state=$(resource_state)
    if [[ $DRY_RUN == 1 ]]; then
      return 0
    fi
    case "$state" in
      READY | ACTIVE) return 0 ;;
      "") note "$(resource_label) does not exist"; return 1 ;;
      FAILED | SUSPENDING | SUSPENDED | PREEMPTED | TERMINATED | STOPPED | STOPPING | DELETING)
        note "$(resource_label) is $state"; return 1 ;;
    esac
    note "$(resource_label) is $state; checking again in ${poll}s"
    sleep "$poll"
  done
}

resource_label() {
  if [[ $QUEUED == 1 ]]; then echo "queued resource $QR_ID"; else echo "TPU VM $NAME"; fi
}
