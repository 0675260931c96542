#!/usr/bin/env bash
# Runs `expint run` on a Cloud TPU VM slice: creates the TPU VM (or a queued resource) unless it
# exists, ships this working tree to every host, installs `.[tpu]`, and runs `expint doctor` then
# `expint run` on every host at once (--worker=all); on a multi-host slice each process finds the
# others through jax.distributed (the CLI calls it; the TPU runtime supplies the addresses).
#
#   launch/tpu_vm.sh [--dry-run] --name NAME --zone ZONE [--project PROJECT] [--type v5p-8]
#       [--version RUNTIME] [--queued] [--spot] [--detach] [--env NAME]... \
#       --config=FILE[:TARGET] [--config.KEY=VALUE ...]
#
# API keys: the variables named by --env (default DEEPSEEK_API_KEY SERPER_API_KEY JINA_API_KEY)
# that are set here are written to a mode-600 file, copied to ~/.expint_env on every host and
# read by the remote shell; their values are never printed or put on a command line.
# --detach leaves the run going after ssh returns (log: ~/expint/launch.log on every host).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$here/common.sh"

repo=$(cd "$here/.." && pwd)
name="" zone="" project="" type=v5p-8 version="" queued=0 spot=0 detach=0
env_names=()
args=()
while (($#)); do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --name) name=${2:?--name needs a TPU name}; shift ;;
    --zone) zone=${2:?--zone needs a zone}; shift ;;
    --project) project=${2:?--project needs a project}; shift ;;
    --type) type=${2:?--type needs an accelerator type, e.g. v5p-8}; shift ;;
    --version) version=${2:?--version needs a runtime version}; shift ;;
    --queued) queued=1 ;;
    --spot) spot=1 ;;
    --detach) detach=1 ;;
    --env) env_names+=("${2:?--env needs a variable name}"); shift ;;
    -h | --help) sed -n '2,14p' "${BASH_SOURCE[0]}"; exit 0 ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1") ;;
  esac
  shift
done
[[ -n $name ]] || die "--name NAME is required (the TPU VM to create or reuse)"
[[ -n $zone ]] || die "--zone ZONE is required"
((${#args[@]})) || die "give the expint run arguments, e.g. --config=configs/paper/qwen3_4b.py:$type"
if [[ -z $version ]]; then
  case $type in
    v5p-*) version=v2-alpha-tpuv5 ;;
    v5litepod-*) version=v2-alpha-tpuv5-lite ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) version=tpu-ubuntu2204-base ;;
  esac
fi
((${#env_names[@]})) || env_names=("${DEFAULT_ENV_NAMES[@]}")

where=(--zone="$zone")
[[ -z $project ]] || where+=(--project="$project")
spot_flag=()
((spot == 0)) || spot_flag=(--spot)
archive=${TMPDIR:-/tmp}/expint-src.tar.gz
remote_dir=expint

# 1. The TPU VM: reuse it when it exists.
if ((DRY_RUN)) || ! gcloud compute tpus tpu-vm describe "$name" "${where[@]}" >/dev/null 2>&1; then
  if ((DRY_RUN)); then note "unless 'gcloud compute tpus tpu-vm describe $name' finds it:"; else note "$name not found: creating it"; fi
  if ((queued)); then
    run gcloud compute tpus queued-resources create "$name" --node-id="$name" "${where[@]}" \
      --accelerator-type="$type" --runtime-version="$version" "${spot_flag[@]}"
    note "then wait until the queued resource is ACTIVE:"
    run gcloud compute tpus queued-resources describe "$name" "${where[@]}" --format='value(state.state)'
    if ((!DRY_RUN)); then
      until [[ $(gcloud compute tpus queued-resources describe "$name" "${where[@]}" \
        --format='value(state.state)') == ACTIVE ]]; do sleep 30; done
    fi
  else
    run gcloud compute tpus tpu-vm create "$name" "${where[@]}" --accelerator-type="$type" \
      --version="$version" "${spot_flag[@]}"
  fi
fi

# 2. The code: this working tree, without the virtual environment, git history or run outputs.
run tar -czf "$archive" -C "$repo" --exclude=./.git --exclude=./.venv --exclude=./runs --exclude=__pycache__ .
run gcloud compute tpus tpu-vm scp "$archive" "$name:~/expint-src.tar.gz" "${where[@]}" --worker=all
install="mkdir -p ~/$remote_dir && tar -xzf ~/expint-src.tar.gz -C ~/$remote_dir && cd ~/$remote_dir"
install+=" && python3 -m pip install --quiet -e '.[tpu]'"
run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$install"

# 3. The keys, by name: a mode-600 file on every host, read by the remote shell.
collect_env_names "${env_names[@]}"
# shellcheck disable=SC2016  # the dry run's placeholder for the file made only when running
env_file='$ENV_FILE'
if ((!DRY_RUN)); then
  env_file=$(mktemp)
  trap 'rm -f "$env_file"' EXIT
  for key in "${FORWARD_NAMES[@]}"; do
    printf 'export %s=%q\n' "$key" "${!key}" >>"$env_file"
  done
fi
note "$env_file: a fresh mktemp file (mode 600), one 'export NAME=...' line for each of: ${FORWARD_NAMES[*]:-(none)}"
run gcloud compute tpus tpu-vm scp "$env_file" "$name:~/.expint_env" "${where[@]}" --worker=all

# 4. The run, on every host at once.
expint="python3 -m expint_jax.cli"
remote="cd ~/$remote_dir && chmod 600 ~/.expint_env && . ~/.expint_env && $expint doctor $(quote_words "${args[@]}")"
if ((detach)); then
  remote+=" && nohup $expint run $(quote_words "${args[@]}") > ~/$remote_dir/launch.log 2>&1 < /dev/null &"
else
  remote+=" && $expint run $(quote_words "${args[@]}")"
fi
run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$remote"
note "when done: gcloud compute tpus tpu-vm delete $name ${where[*]}"
