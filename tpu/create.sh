#!/usr/bin/env bash
# Creates a TPU VM or pod slice.
#
#   TPU_NAME=jaxrl-v5e-8 ZONE=us-west4-a ACCELERATOR=v5litepod-8 VERSION=v2-alpha-tpuv5-lite tpu/create.sh [--dry-run]
#
# Optional: PROJECT (else gcloud's configured project).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1 && shift; fi
no_more_args "$@"
require TPU_NAME "name of the TPU VM or pod slice, e.g. jaxrl-v5e-8" \
  ZONE "a zone that has the accelerator, e.g. us-west4-a (v5e) or us-east5-a (v5p)" \
  ACCELERATOR "accelerator type, e.g. v5litepod-8 (1 host, 8 chips) or v5p-32 (4 hosts, 16 chips)" \
  VERSION "TPU runtime image, e.g. v2-alpha-tpuv5-lite (v5e) or v2-alpha-tpuv5 (v5p)"
gcloud_flags
run gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_FLAGS[@]}" \
  --accelerator-type "$ACCELERATOR" --version "$VERSION"
