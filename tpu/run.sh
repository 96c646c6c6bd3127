#!/usr/bin/env bash
# Runs `python -m jaxrl_llm.train --config CONFIG [overrides...]` on every host of the TPU at once.
#
#   TPU_NAME=jaxrl-v5e-8 ZONE=us-west4-a tpu/run.sh [--dry-run] CONFIG [--config.key=value ...]
#
# CONFIG is a path inside the checkout that tpu/setup.sh copied (e.g. configs/tpu/qwen3_0.6b_grpo_v5e8.py);
# paths in overrides (model.path, data.path) are paths on the TPU hosts. Optional: PROJECT.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1 && shift; fi
if (($# == 0)); then
  echo "usage: tpu/run.sh [--dry-run] CONFIG [--config.key=value ...]" >&2
  exit 2
fi
require TPU_NAME "name of the TPU VM or pod slice, e.g. jaxrl-v5e-8" ZONE "its zone, e.g. us-west4-a"
gcloud_flags
train="cd ~/jaxrl_llm && .venv/bin/python -m jaxrl_llm.train $(shell_words --config "$@")"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command "$train"
