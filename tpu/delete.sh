#!/usr/bin/env bash
# Deletes the TPU VM or pod slice (without asking: --quiet).
#
#   TPU_NAME=jaxrl-v5e-8 ZONE=us-west4-a tpu/delete.sh [--dry-run]
#
# Optional: PROJECT (else gcloud's configured project).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1 && shift; fi
no_more_args "$@"
require TPU_NAME "name of the TPU VM or pod slice, e.g. jaxrl-v5e-8" ZONE "its zone, e.g. us-west4-a"
gcloud_flags
run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --quiet
