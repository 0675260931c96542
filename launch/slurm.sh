#!/usr/bin/env bash
# Runs `expint run` on a multi-node GPU cluster under SLURM: one process per node, each using all
# of its GPUs; process 0's node is the jax.distributed coordinator (EXPINT_COORDINATOR,
# EXPINT_NUM_PROCESSES, EXPINT_PROCESS_ID, read by the CLI). Writes the batch script to
# runs/slurm/JOB.sbatch and submits it; the job runs `expint doctor`, then `expint run`.
#
#   launch/slurm.sh [--dry-run] [--setup] --nodes N [--gpus-per-node 8] [--partition P]
#       [--account A] [--time 48:00:00] [--job-name expint] [--port 12321] [--venv DIR]
#       [--env NAME]... --config=FILE[:TARGET] [--config.KEY=VALUE ...]
#
# --setup first makes the virtual environment (on the shared file system) and installs
# `.[cuda]`. API keys: the job inherits this shell's environment (--export=ALL), so the variables
# named by --env (default DEEPSEEK_API_KEY SERPER_API_KEY JINA_API_KEY) reach every node without
# their values being written anywhere; the names that are not set are reported.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$here/common.sh"

repo=$(cd "$here/.." && pwd)
nodes="" gpus=8 partition="" account="" time_limit=48:00:00 job=expint port=12321 setup=0
venv=$repo/.venv
env_names=()
args=()
while (($#)); do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --setup) setup=1 ;;
    --nodes) nodes=${2:?--nodes needs a number}; shift ;;
    --gpus-per-node) gpus=${2:?--gpus-per-node needs a number}; shift ;;
    --partition) partition=${2:?--partition needs a partition}; shift ;;
    --account) account=${2:?--account needs an account}; shift ;;
    --time) time_limit=${2:?--time needs a limit, e.g. 48:00:00}; shift ;;
    --job-name) job=${2:?--job-name needs a name}; shift ;;
    --port) port=${2:?--port needs a port}; shift ;;
    --venv) venv=${2:?--venv needs a directory}; shift ;;
    --env) env_names+=("${2:?--env needs a variable name}"); shift ;;
    -h | --help) sed -n '2,15p' "${BASH_SOURCE[0]}"; exit 0 ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1") ;;
  esac
  shift
done
[[ $nodes =~ ^[1-9][0-9]*$ ]] || die "--nodes N is required (a positive number)"
[[ $gpus =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node $gpus: not a positive number"
[[ $job =~ ^[A-Za-z0-9_.-]+$ ]] || die "--job-name $job: letters, digits, '_', '.' and '-' only"
((${#args[@]})) || die "give the expint run arguments, e.g. --config=configs/paper/qwen3_8b.py:8xh100"
((${#env_names[@]})) || env_names=("${DEFAULT_ENV_NAMES[@]}")

if ((setup)); then
  run python3 -m venv "$venv"
  run "$venv/bin/pip" install -e "${repo}[cuda]"
fi
collect_env_names "${env_names[@]}"

expint_args=$(quote_words "${args[@]}")
sbatch_file=$repo/runs/slurm/$job.sbatch
directives="#SBATCH --job-name=$job
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus
#SBATCH --time=$time_limit
#SBATCH --output=$repo/runs/slurm/%x-%j.out
#SBATCH --export=ALL"
[[ -z $partition ]] || directives+=$'\n'"#SBATCH --partition=$partition"
[[ -z $account ]] || directives+=$'\n'"#SBATCH --account=$account"
batch="#!/usr/bin/env bash
$directives
# API keys come from the submitting shell's environment (--export=ALL); none is written here.
set -euo pipefail
cd $(quote_words "$repo")
head_node=\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | head -n 1)
export EXPINT_COORDINATOR=\"\$head_node:$port\"
export EXPINT_NUM_PROCESSES=\"\$SLURM_NNODES\"
# One process per node, each told its id: jax.distributed joins them (doctor too, so that it sees
# the devices and mesh the run will).
each_node() {
  # shellcheck disable=SC2016  # each task's own shell expands \$SLURM_PROCID
  srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c 'EXPINT_PROCESS_ID=\$SLURM_PROCID exec \"\$@\"' each_node \"\$@\"
}
each_node $(quote_words "$venv/bin/expint") doctor $expint_args
each_node $(quote_words "$venv/bin/expint") run $expint_args"

run mkdir -p "$repo/runs/slurm"
if ((DRY_RUN)); then
  printf "cat > %s <<'SBATCH'\n%s\nSBATCH\n" "$(quote_words "$sbatch_file")" "$batch"
else
  printf '%s\n' "$batch" >"$sbatch_file"
fi
run sbatch "$sbatch_file"
