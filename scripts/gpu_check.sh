#!/usr/bin/env bash
# The one script to run on a machine with an NVIDIA GPU (issue 17 item 5): every measurement and check that
# needs the GPU, most wanted first, within a time budget, all of it logged.
#
#   scripts/gpu_check.sh [--dry-run] [--out DIR] [--budget SECONDS] [--test-s SECONDS] [--only bench|tests]
#                        [--gpu-gib N] [--wheels DIR] [--pack] [--quick]
#
#   1. the machine: `nvidia-smi -L`, JAX's devices (the step fails unless JAX runs on the GPU), the versions
#      of jax, flax, optax, transformers and torch, and an import of what the benches and tests need
#   2. scripts/bench_all.sh --gpu --out DIR/bench: Qwen2.5-0.5B SFT MFU at batch 8 x 1024 without and with
#      remat, rollouts against HF generate, a Qwen2.5-0.5B GRPO iteration, the README's H100 rows, then the
#      planner's largest batch that fits in --gpu-gib; DIR/bench/table.md is their table
#   3. the suite's model, sampler and train-step tests under JAX CUDA (`-m 'not slow'`: the slow ones spawn
#      simulated-CPU-device processes), `--junitxml DIR/pytest.xml`
#   JAX may take 90% of the GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION, unless set; its default is 75%).
#
#   --dry-run     print every command (bench_all.sh's own, indented under it) and run nothing
#   --out DIR     where everything goes (default runs/gpu_check/<date>-<time>); DIR/log.txt has all output
#   --budget S    finish within S seconds (default 570; 0: no limit): the benches get what the tests do not
#                 keep, a command still running when its share is spent is stopped and counts as failed,
#                 and one not started by then is skipped (reported, exit 1)
#   --test-s S    the seconds kept for the tests (default 180)
#   --only WHAT   run only the benches (bench) or only the tests (tests), after the machine step
#   --gpu-gib N   the GPU memory the largest-batch rows must fit in, GiB (default 80)
#   --wheels DIR  first install DIR/*.whl offline (pip --no-index --no-deps) into a folder put on PYTHONPATH:
#                 packages the machine lacks (default: the checkout's .whl, where it holds wheels)
#   --pack        at the end, pack DIR/bench into DIR/bench.tar.gz (its table copied to DIR/table.md) and
#                 remove it: four files in DIR, for a machine whose results come back as few files
#   --quick       bench_all.sh --quick: tiny models, a smoke test of the script, not numbers to quote
#
# PYTHON picks the interpreter (default: the checkout's .venv/bin/python, else python3). Every step runs,
# whatever became of the ones before; the script exits 1 if any failed or was skipped, and says which.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$root/scripts/lib.sh"

usage() { sed -n '2,34s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

dry_run=0 out="" budget=570 test_s=180 gpu_gib=80 wheels="" pack=0 quick=0 only=""
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --out) out="${2:?--out needs a directory}" && shift ;;
    --out=*) out="${1#--out=}" ;;
    --budget) budget="${2:?--budget needs seconds}" && shift ;;
    --budget=*) budget="${1#--budget=}" ;;
    --test-s) test_s="${2:?--test-s needs seconds}" && shift ;;
    --test-s=*) test_s="${1#--test-s=}" ;;
    --gpu-gib) gpu_gib="${2:?--gpu-gib needs a number of GiB}" && shift ;;
    --gpu-gib=*) gpu_gib="${1#--gpu-gib=}" ;;
    --wheels) wheels="${2:?--wheels needs a directory}" && shift ;;
    --wheels=*) wheels="${1#--wheels=}" ;;
    --only) only="${2:?--only needs bench or tests}" && shift ;;
    --only=*) only="${1#--only=}" ;;
    --pack) pack=1 ;;
    --quick) quick=1 ;;
    -h | --help) usage && exit 0 ;;
    *) echo "scripts/gpu_check.sh: unknown argument '$1'" >&2 && usage >&2 && exit 2 ;;
  esac
  shift
done
for pair in "--budget:$budget" "--test-s:$test_s"; do
  if [[ ! "${pair#*:}" =~ ^[0-9]+$ ]]; then
    echo "scripts/gpu_check.sh: ${pair%%:*} '${pair#*:}': expected whole seconds" >&2 && exit 2
  fi
done
if [[ -n "$only" && "$only" != bench && "$only" != tests ]]; then
  echo "scripts/gpu_check.sh: --only '$only': expected bench or tests" >&2 && exit 2
fi
if [[ "$only" == bench ]]; then test_s=0; fi
if ((budget && test_s >= budget)) && [[ "$only" != tests ]]; then
  echo "scripts/gpu_check.sh: --test-s $test_s leaves nothing of --budget $budget for the benches" >&2 && exit 2
fi
out="$(absolute "${out:-$root/runs/gpu_check/$(date +%Y%m%d-%H%M%S)}")"
python="$(python_of "$root")"
if [[ -z "$wheels" ]] && compgen -G "$root/.whl/*.whl" >/dev/null; then wheels="$root/.whl"; fi

# The suite's tests that run the model, the sampler and the train step, most telling on a GPU first.
tests=(
  tests/test_models_parity.py tests/test_models_cache.py tests/test_models_attention.py
  tests/test_rollout_sampler.py tests/test_rollout_sampling.py tests/test_rollout_engine.py
  tests/test_train_step.py tests/test_models_execution.py tests/test_models_shapes.py
)
versions='from importlib.metadata import version as v; print(*(d + " " + v(d) for d in ("jax", "jaxlib", '
versions+='"flax", "optax", "transformers", "torch")), sep=", "); import jaxrl_llm.bench.rl, jaxrl_llm.config, '
versions+='jaxrl_llm.rollout'

failed=()
# spent: the seconds this run has taken so far; a dry run takes none, so that what it prints does not depend on
# when a second ticks over.
spent() { if ((dry_run)); then echo 0; else echo "$SECONDS"; fi; }
# step NAME ARG...: run ARG... from the checkout, after a header line; a non-zero exit is recorded as failed.
step() {
  local name="$1"
  shift
  if ((dry_run)); then
    show "$@"
    return
  fi
  echo
  echo "### $name (${SECONDS}s in): $(show "$@")"
  local rc=0
  (cd "$root" && "$@") || rc=$?
  if ((rc == 124)); then
    echo "### $name: FAILED: stopped when its time ran out (--budget)"
    failed+=("$name")
  elif ((rc)); then
    echo "### $name: FAILED (exit status $rc)"
    failed+=("$name")
  fi
}

if ((!dry_run)); then
  mkdir -p "$out" || exit 1
  exec > >(tee -a "$out/log.txt") 2>&1
  echo "scripts/gpu_check.sh: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(git -C "$root" rev-parse --short HEAD 2>/dev/null)," \
    "budget ${budget}s, XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}, into $out"
fi
# JAX may take 90% of the GPU's memory, not its default 75% (60 of an H100's 80 GB): the planner puts SFT
# without remat at 8 x 1024 at 78 GiB (XLA:CPU's figure; a GPU's is smaller). HF generate, the rollout rows'
# peer in the same process, needs a few GB of the rest.
export PYTHON="$python" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
if [[ -n "$wheels" ]]; then
  site="${TMPDIR:-/tmp}/jaxrl_llm_wheels"
  step wheels "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
step nvidia-smi nvidia-smi -L
step jax-devices "$python" -c 'import jax; print(jax.devices()); assert jax.default_backend() == "gpu", "no GPU"'
step imports "$python" -c "$versions"

bench=("$root/scripts/bench_all.sh" --gpu --gpu-gib "$gpu_gib" --out "$out/bench")
if ((quick)); then bench+=(--quick); fi
if ((budget)); then bench+=(--budget "$((budget - test_s - $(spent)))"); fi
if [[ "$only" == tests ]]; then
  :
elif ((dry_run)); then
  show "${bench[@]}"
  "${bench[@]}" --dry-run | sed 's/^/  /'
else
  step bench "${bench[@]}"
fi

pytest=("$python" -m pytest -q -m 'not slow' -p no:cacheprovider "${tests[@]}" --junitxml "$out/pytest.xml")
if ((budget)); then
  left=$((budget - $(spent)))
  if ((left < 1)); then left=1; fi
  pytest=(timeout --signal=INT --kill-after=15 "$left" "${pytest[@]}")  # INT: pytest still reports
fi
if [[ "$only" != bench ]]; then step tests "${pytest[@]}"; fi

if ((pack)) && [[ "$only" != tests ]]; then
  step pack tar -czf "$out/bench.tar.gz" -C "$out" bench
  if ((!dry_run)) && [[ -f "$out/bench.tar.gz" ]]; then
    cp "$out/bench/table.md" "$out/table.md" 2>/dev/null
    rm -rf "$out/bench"
  fi
fi
if ((dry_run)); then exit 0; fi
for table in "$out/bench/table.md" "$out/table.md"; do
  if [[ -f "$table" ]]; then
    echo
    echo "### summary: the benchmarks' table (every number is in this log above it)"
    cat "$table"
    break
  fi
done
echo
if ((${#failed[@]})); then
  echo "scripts/gpu_check.sh: done in ${SECONDS}s; FAILED: ${failed[*]} (log: $out/log.txt)"
  exit 1
fi
echo "scripts/gpu_check.sh: done in ${SECONDS}s; every step passed (log: $out/log.txt)"
