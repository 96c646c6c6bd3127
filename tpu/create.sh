#!/usr/bin/env bash
# Creates a TPU VM or pod slice: TPU_NAME, ZONE, ACCELERATOR (e.g. v5litepod-8), VERSION (runtime image).
set -euo pipefail
: "${TPU_NAME:?}" "${ZONE:?}" "${ACCELERATOR:?}" "${VERSION:?}"
gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR" --version "$VERSION"
