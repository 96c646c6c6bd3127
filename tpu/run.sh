#!/usr/bin/env bash
# Runs `python -m jaxrl_llm.train --config CONFIG [overrides...]` on every host of the TPU at once.
set -euo pipefail
: "${TPU_NAME:?}" "${ZONE:?}"
config="${1:?usage: tpu/run.sh CONFIG [--config.key=value ...]}"
shift
overrides="$(printf ' %q' "$@")"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd ~/jaxrl_llm && .venv/bin/python -m jaxrl_llm.train --config $config$overrides"
