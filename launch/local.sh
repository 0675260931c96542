#!/usr/bin/env bash
# Runs `expint run` on this machine (CPU, one GPU host or one TPU VM host), after `expint doctor`.
#
#   launch/local.sh [--dry-run] [--setup] [--venv DIR] [--extra tpu|cuda|none] [--env NAME]... \
#       [--config=FILE[:TARGET] [--config.KEY=VALUE ...]]
#
# --setup makes the virtual environment and installs the package with the extra (default: none);
# the expint arguments default to --config=configs/loop_tiny.py. API keys are read from this
# shell's environment; only their names are shown.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$here/common.sh"

repo=$(cd "$here/.." && pwd)
venv=.venv
extra=none
setup=0
env_names=()
args=()
while (($#)); do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --setup) setup=1 ;;
    --venv) venv=${2:?--venv needs a directory}; shift ;;
    --extra) extra=${2:?--extra needs tpu, cuda or none}; shift ;;
    --env) env_names+=("${2:?--env needs a variable name}"); shift ;;
    -h | --help) sed -n '2,9p' "${BASH_SOURCE[0]}"; exit 0 ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1") ;;
  esac
  shift
done
case $extra in
  tpu | cuda) spec=".[$extra]" ;;
  none) spec="." ;;
  *) die "--extra $extra: choose tpu, cuda or none" ;;
esac
((${#args[@]})) || args=(--config=configs/loop_tiny.py)
((${#env_names[@]})) || env_names=("${DEFAULT_ENV_NAMES[@]}")

run cd "$repo"
if ((setup)); then
  run python3 -m venv "$venv"
  run "$venv/bin/pip" install -e "$spec"
fi
collect_env_names "${env_names[@]}"
run "$venv/bin/expint" doctor "${args[@]}"
run "$venv/bin/expint" run "${args[@]}"
