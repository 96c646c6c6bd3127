#!/usr/bin/env bash
# Copies this checkout to every host of the TPU and installs JAX for TPU plus the package in ~/jaxrl_llm/.venv.
#
#   TPU_NAME=jaxrl-v5e-8 ZONE=us-west4-a tpu/setup.sh [--dry-run]
#
# Optional: PROJECT (else gcloud's configured project); REMOTE_PYTHON, the hosts' Python (>= 3.11, which the
# package requires; default python3: check `python3 --version` on the image, and install e.g. python3.11 if it
# is older).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1 && shift; fi
no_more_args "$@"
require TPU_NAME "name of the TPU VM or pod slice, e.g. jaxrl-v5e-8" ZONE "its zone, e.g. us-west4-a"
gcloud_flags
root="$(cd "$here/.." && pwd)"
archive="${TMPDIR:-/tmp}/jaxrl_llm.tgz"
python="${REMOTE_PYTHON:-python3}"
install="mkdir -p ~/jaxrl_llm && tar -C ~/jaxrl_llm -xzf ~/jaxrl_llm.tgz && cd ~/jaxrl_llm"
install+=" && $python -m venv .venv && .venv/bin/pip install -q -U pip 'jax[tpu]' && .venv/bin/pip install -q -e ."
run tar -C "$root" --exclude=.venv --exclude=runs --exclude=.git -czf "$archive" .
run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:~/" "${GCLOUD_FLAGS[@]}" --worker=all
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command "$install"
