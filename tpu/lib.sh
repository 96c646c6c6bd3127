# shellcheck shell=bash
# Sourced by the other tpu/ scripts (not run on its own): the dry run, required variables, the gcloud flags.
#
# Every script takes --dry-run as its first argument: each command it would run (gcloud, tar) is printed,
# one line each, quoted so that it can be pasted into a shell, and nothing is run or created.

DRY_RUN=0

# run CMD [ARG...]: runs the command, or with --dry-run prints it.
run() {
  if ((DRY_RUN)); then
    shell_words "$@"
  else
    "$@"
  fi
}

# shell_words ARG...: the arguments on one line, single-quoted where the shell would split or expand them.
shell_words() {
  local word out=()
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("$word")
    else
      out+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  printf '%s\n' "${out[*]}"
}

# require NAME "what it is" [NAME "what it is" ...]: exits 2 naming every variable that is unset or empty.
require() {
  local missing=()
  while (($# >= 2)); do
    if [[ -z "${!1:-}" ]]; then
      missing+=("$(printf '  %-12s %s' "$1" "$2")")
    fi
    shift 2
  done
  if ((${#missing[@]})); then
    {
      echo "tpu/$(basename "$0"): missing required environment variable(s):"
      printf '%s\n' "${missing[@]}"
      echo "export them first (tpu/README.md shows a full example), e.g."
      echo "  export TPU_NAME=jaxrl-v5e-8 ZONE=us-west4-a ACCELERATOR=v5litepod-8 VERSION=v2-alpha-tpuv5-lite"
    } >&2
    exit 2
  fi
}

# no_more_args "$@": exits 2 when a script that takes no arguments (other than --dry-run) got some.
no_more_args() {
  if (($#)); then
    echo "tpu/$(basename "$0"): unexpected argument '$1' (only --dry-run, first, is accepted)" >&2
    exit 2
  fi
}

# gcloud_flags: the flags every `gcloud compute tpus tpu-vm` call takes (--zone, and --project when PROJECT
# is set; otherwise gcloud's configured project), in the array GCLOUD_FLAGS.
gcloud_flags() {
  GCLOUD_FLAGS=(--zone "$ZONE")
  if [[ -n "${PROJECT:-}" ]]; then
    GCLOUD_FLAGS+=(--project "$PROJECT")
  fi
}
