#!/usr/bin/env bash
# Copies this checkout to every host of the TPU and installs JAX for TPU plus the package.
set -euo pipefail
: "${TPU_NAME:?}" "${ZONE:?}"
root="$(cd "$(dirname "$0")/.." && pwd)"
tar -C "$root" --exclude=.venv --exclude=runs --exclude=.git -czf /tmp/jaxrl_llm.tgz .
gcloud compute tpus tpu-vm scp /tmp/jaxrl_llm.tgz "$TPU_NAME":~/ --zone "$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  'mkdir -p ~/jaxrl_llm && tar -C ~/jaxrl_llm -xzf ~/jaxrl_llm.tgz && cd ~/jaxrl_llm &&
   python3 -m venv .venv && .venv/bin/pip install -q -U pip "jax[tpu]" && .venv/bin/pip install -q -e .'
