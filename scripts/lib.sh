# shellcheck shell=bash
# What scripts/bench_all.sh and scripts/gpu_check.sh share; sourced, not run.

# absolute PATH: PATH, made absolute against the current directory.
absolute() {
  if [[ "$1" == /* ]]; then printf '%s\n' "$1"; else printf '%s\n' "$PWD/$1"; fi
}

# python_of ROOT: the interpreter to run: $PYTHON, else ROOT's .venv/bin/python, else python3.
python_of() {
  if [[ -n "${PYTHON:-}" ]]; then
    printf '%s\n' "$PYTHON"
  elif [[ -x "$1/.venv/bin/python" ]]; then
    printf '%s\n' "$1/.venv/bin/python"
  else
    printf '%s\n' python3
  fi
}

# show ARG...: the command on one line, single-quoted where the shell would split or expand a word.
show() {
  local word words=()
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then words+=("$word"); else words+=("'${word//\'/\'\\\'\'}'"); fi
  done
  printf '%s\n' "${words[*]}"
}
