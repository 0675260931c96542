# shellcheck shell=bash disable=SC2034  # the variables here are read by the scripts that source it
# What launch/*.sh share: --dry-run (print each command exactly as it would run, run nothing),
# shell quoting, and the environment variables a run reads API keys from -- by name only: a value
# is never printed, written into a script, or put on a command line.

DRY_RUN=0
# The variables the paper's configs read keys from (writer/selector/judge, search, visit);
# --env NAME (repeatable) replaces the list.
DEFAULT_ENV_NAMES=(DEEPSEEK_API_KEY SERPER_API_KEY JINA_API_KEY)

# The words, each quoted only where the shell needs it, on one line. A word that is exactly
# $NAME is a placeholder of the dry run (a file made only when running for real): shown "$NAME".
quote_words() {
  local out="" word
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+="$word "
    elif [[ $word =~ ^\$[A-Z_]+$ ]]; then
      out+="\"$word\" "
    else
      out+="'${word//\'/\'\\\'\'}' "
    fi
  done
  printf '%s\n' "${out% }"
}

# Runs a command; under --dry-run prints it instead.
run() {
  if ((DRY_RUN)); then
    quote_words "$@"
  else
    "$@"
  fi
}

# A remark: a '#' line of the dry run's output (stderr when running for real).
note() {
  if ((DRY_RUN)); then
    printf '# %s\n' "$*"
  else
    printf 'launch: %s\n' "$*" >&2
  fi
}

die() {
  printf 'launch: %s\n' "$*" >&2
  exit 2
}

# Sets FORWARD_NAMES to the names among "$@" that are set here and notes those that are not.
FORWARD_NAMES=()
collect_env_names() {
  local name
  FORWARD_NAMES=()
  for name in "$@"; do
    [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "--env $name: not a variable name"
    if [[ -n ${!name:-} ]]; then
      FORWARD_NAMES+=("$name")
    else
      note "$name is not set here; 'expint doctor' says whether the config needs it"
    fi
  done
}
