#!/usr/bin/env bash
# Install jrft on every worker of a TPU VM: source (a copy of this checkout, or a git clone), a venv, and
# `pip install -e '.[tpu]'`. Safe to rerun: it updates the source and reinstalls. See tpu/README.md.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
usage: tpu/install.sh --name NAME --zone ZONE [--repo URL [--ref REF]] [--extras tpu] [--pip PKG]...
                      [--python python3] [--dry-run]

Puts jrft in ~/REMOTE_DIR on every worker (--worker=all) and installs it into ~/REMOTE_DIR/.venv.
Source: by default a tarball of this checkout (the files git tracks plus untracked, non-ignored ones),
copied with 'gcloud compute tpus tpu-vm scp --worker=all'; with --repo, a git clone of URL at REF.

Options:
  --repo URL        clone this git repository on the workers instead of copying the local checkout
  --ref REF         branch, tag or commit to check out with --repo (default: the remote's HEAD)
  --extras LIST     pip extras of jrft to install (default: tpu, i.e. jax[tpu] with libtpu)
  --pip PKG         one more pip requirement to install, repeatable (e.g. --pip gcsfs)
  --python PY       interpreter that creates the venv on the workers (default: python3)

$COMMON_HELP
EOF
}

REPO_URL=""
REF="HEAD"
EXTRAS="tpu"
PYTHON="python3"
PIP_EXTRA=()
while [[ $# -gt 0 ]]; do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case "$1" in
    --repo) REPO_URL=${2:?--repo needs a value}; shift 2 ;;
    --ref) REF=${2:?--ref needs a value}; shift 2 ;;
    --extras) EXTRAS=${2:?--extras needs a value}; shift 2 ;;
    --pip) PIP_EXTRA+=("${2:?--pip needs a value}"); shift 2 ;;
    --python) PYTHON=${2:?--python needs a value}; shift 2 ;;
    *) parse_common "$@" || die "unknown option '$1' (see --help)"; shift "$CONSUMED" ;;
  esac
done
require_target
location_flags

# shellcheck disable=SC2088  # the tilde is for the remote shell to expand
dir="~/$REMOTE_DIR"
if [[ -z $REPO_URL ]]; then
  # A deterministic path, so --dry-run output is stable; overwritten by every install.
  tarball="${TMPDIR:-/tmp}/jrft-src-$NAME.tar.gz"
  # shellcheck disable=SC2016  # $1/$2 belong to the inner bash
  pack='git -C "$1" ls-files -z --cached --others --exclude-standard | tar -czf "$2" -C "$1" --null -T -'
  run bash -c "$pack" _ "$REPO_ROOT" "$tarball"
  run "$GCLOUD" compute tpus tpu-vm scp "$tarball" "$NAME:jrft-src.tar.gz" "${LOCATION[@]}" --worker=all
  fetch="mkdir -p $dir && tar -xzf ~/jrft-src.tar.gz -C $dir && rm -f ~/jrft-src.tar.gz"
else
  fetch="{ [ -d $dir/.git ] || git clone --quiet $(shq "$REPO_URL") $dir; }"
  fetch+=" && git -C $dir fetch --quiet origin $(shq "$REF") && git -C $dir checkout --quiet --detach FETCH_HEAD"
fi

pip_args=("-e" ".[$EXTRAS]" "${PIP_EXTRA[@]}")
remote="set -euo pipefail; $fetch && cd $dir"
# TPU images may lack ensurepip (python3-venv); install it only when missing.
remote+=" && { $PYTHON -c 'import ensurepip' 2>/dev/null"
remote+=" || { sudo apt-get -qq update && sudo apt-get -qq install -y python3-venv; }; }"
remote+=" && { [ -x .venv/bin/python ] || $PYTHON -m venv .venv; }"
remote+=" && .venv/bin/pip install --quiet --upgrade pip"
remote+=" && .venv/bin/pip install --quiet $(quote_cmd "${pip_args[@]}")"
remote+=" && .venv/bin/python -c 'import jax, jrft; print(\"jrft\", jrft.__version__, \"jax\", jax.__version__)'"
ssh_workers all "$remote"
