#!/usr/bin/env bash
# Reproduces the README's benchmark tables: runs each `python -m jaxrl_llm.bench ...` command they came from
# (ours against HF transformers / TRL in the same run where a table compares them), each writing its JSON
# into the output directory, then writes one markdown table of all of them (scripts/bench_table.py).
#
#   scripts/bench_all.sh [--dry-run] [--quick] [--gpu] [--gpu-gib N] [--budget SECONDS] [--out DIR]
#
#   --dry-run     print every command, one a line, and run nothing
#   --quick       the same commands on tiny models (llama-tiny, qwen2-tiny) with fewer repeats: a smoke test
#                 of the pipeline, not numbers to quote
#   --gpu         the GPU rows instead of the CPU tables, most wanted first (issue 17 item 5): Qwen2.5-0.5B SFT
#                 in bf16 at batch 8 x 1024 without and with --remat full (MFU), rollouts against HF generate
#                 on the same GPU, a Qwen2.5-0.5B GRPO iteration, then the README's H100 rows (bf16/fp32 peak,
#                 SFT steps), then the memory planner's largest Qwen2.5-0.5B SFT batch at 1024 and 2048
#                 tokens, without and with --remat full (planned on the CPU: no GPU needed)
#   --gpu-gib N   the memory the largest-batch rows must fit in, GiB per device (default 80)
#   --budget S    start no command after S seconds from the script's start, and stop one still running
#                 then (left out of the table and reported, exit 1)
#   --out DIR     where the JSON files and table.md go (default runs/bench/<date>-<time> in the checkout)
#
# The --compare-hf / --compare-trl peers need the test extra (pip install -e '.[test]': torch, trl); PYTHON
# picks the interpreter (default: the checkout's .venv/bin/python, else python3). A command that fails is
# reported and left out of the table; the script then exits 1.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$root/scripts/lib.sh"

usage() { sed -n '2,26s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

dry_run=0 quick=0 gpu=0 out="" gpu_gib=80 budget=""
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --quick) quick=1 ;;
    --gpu) gpu=1 ;;
    --gpu-gib) gpu_gib="${2:?--gpu-gib needs a number of GiB}" && shift ;;
    --gpu-gib=*) gpu_gib="${1#--gpu-gib=}" ;;
    --budget) budget="${2:?--budget needs a number of seconds}" && shift ;;
    --budget=*) budget="${1#--budget=}" ;;
    --out) out="${2:?--out needs a directory}" && shift ;;
    --out=*) out="${1#--out=}" ;;
    -h | --help) usage && exit 0 ;;
    *) echo "scripts/bench_all.sh: unknown argument '$1'" >&2 && usage >&2 && exit 2 ;;
  esac
  shift
done
if [[ ! "$gpu_gib" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
  echo "scripts/bench_all.sh: --gpu-gib '$gpu_gib': expected a number of GiB" >&2 && exit 2
fi
if [[ -n "$budget" && ! "$budget" =~ ^[0-9]+$ ]]; then
  echo "scripts/bench_all.sh: --budget '$budget': expected whole seconds" >&2 && exit 2
fi
out="$(absolute "${out:-$root/runs/bench/$(date +%Y%m%d-%H%M%S)}")"
python="$(python_of "$root")"

# Sizes: the README's, or tiny models for --quick (shorter rows; the largest-batch search without its
# compiles, which take ~8 s a plan whatever the model, stopping at batch 8).
small=llama-30m qwen=qwen2.5-0.5b repeats=() grpo_repeats=(--repeats 3) sft_len=1024 fit_lens=(1024 2048)
fit=(--fit-gib "$gpu_gib")
if ((quick)); then
  small=llama-tiny qwen=qwen2-tiny repeats=(--repeats 2) grpo_repeats=(--repeats 2) sft_len=256 fit_lens=(64 128)
  fit+=(--no-compile --fit-max 8)
fi

count=0
failed=()
skipped=()
# bench NAME ARG...: `python -m jaxrl_llm.bench ARG... --json OUT/NN_NAME.json`; NN keeps the order they run in.
# With --budget, a command is skipped once the budget is spent and stopped (`timeout`) when it runs out.
bench() {
  local name="$1" file limit=()
  shift
  count=$((count + 1))
  file="$out/$(printf '%02d' "$count")_$name.json"
  local cmd=("$python" -m jaxrl_llm.bench "$@" --json "$file")
  if ((dry_run)); then
    show "${cmd[@]}"
    return
  fi
  if [[ -n "$budget" ]]; then
    if ((SECONDS >= budget)); then
      echo "scripts/bench_all.sh: skipped $name: the ${budget}s budget is spent" >&2
      skipped+=("$name")
      return
    fi
    limit=(timeout --kill-after=15 "$((budget - SECONDS))")
  fi
  echo "== $(printf '%02d' "$count")_$name (${SECONDS}s in): $(show "${cmd[@]}")"
  local rc=0
  (cd "$root" && ${limit[@]+"${limit[@]}"} "${cmd[@]}") || rc=$?
  if ((rc == 124 && ${#limit[@]})); then
    failed+=("$name (stopped: the budget ran out)")
  elif ((rc)); then
    failed+=("$name")
  fi
}

if ((!dry_run)); then mkdir -p "$out"; fi
if ((gpu)); then
  # Issue 17 item 5 first, the quickest and most wanted: Qwen2.5-0.5B SFT (bf16 compute, fp32 parameters and
  # AdamW) at batch 8 x 1024, whose fraction of the matmul peak is the MFU (target >= 0.40), without and with
  # remat; the README's rollouts against HF generate on the same GPU; one whole Qwen2.5-0.5B GRPO iteration.
  bench sft_qwen_bf16_mfu train --objective sft --model "$qwen" --batch 8 --seq-len "$sft_len" --dtype bfloat16 \
    ${repeats[@]+"${repeats[@]}"}
  bench sft_qwen_bf16_mfu_remat train --objective sft --model "$qwen" --batch 8 --seq-len "$sft_len" \
    --dtype bfloat16 --remat full ${repeats[@]+"${repeats[@]}"}
  bench rollout_fp32_greedy rollout --model "$small" --batch 16 --prompt-len 64 --new-tokens 128 --compare-hf \
    ${repeats[@]+"${repeats[@]}"}
  bench rollout_bf16_sample rollout --model "$small" --batch 256 --prompt-len 128 --new-tokens 256 \
    --dtype bfloat16 --sample --compare-hf ${repeats[@]+"${repeats[@]}"}
  bench rollout_qwen_bf16_sample rollout --model "$qwen" --batch 64 --prompt-len 128 --new-tokens 256 \
    --dtype bfloat16 --sample --compare-hf ${repeats[@]+"${repeats[@]}"}
  bench grpo_qwen_bf16 train --objective grpo --model "$qwen" --prompts 8 --group 8 --prompt-len 128 \
    --new-tokens 256 --dtype bfloat16 "${grpo_repeats[@]}"
  # The rest of the README's "On one NVIDIA H100" paragraph.
  bench peak_bfloat16 peak --dtype bfloat16
  bench peak_float32 peak --dtype float32
  bench sft_fp32 train --objective sft --model "$small" --batch 8 --seq-len 256 ${repeats[@]+"${repeats[@]}"}
  bench sft_bf16 train --objective sft --model "$small" --batch 8 --seq-len 256 --dtype bfloat16 \
    ${repeats[@]+"${repeats[@]}"}
  bench sft_qwen_bf16 train --objective sft --model "$qwen" --batch 8 --seq-len 512 --dtype bfloat16 \
    --remat full ${repeats[@]+"${repeats[@]}"}
  # The largest SFT batch that fits in --gpu-gib, as the memory planner plans it (XLA:CPU's compile: the
  # same figures on any machine, last because they need no GPU).
  for len in "${fit_lens[@]}"; do
    for remat in none full; do
      bench "fit_qwen_sft_${len}_remat_$remat" memory --preset "$qwen" --stage sft --seq-len "$len" \
        --dtype bfloat16 --remat "$remat" "${fit[@]}"
    done
  done
else
  # The README's CPU table (fp32), then its serving table.
  bench peak peak
  bench forward forward --model "$small" --batch 8 --seq-len 256 --compare-hf ${repeats[@]+"${repeats[@]}"}
  bench sft train --objective sft --model "$small" --batch 8 --seq-len 256 --compare-trl \
    ${repeats[@]+"${repeats[@]}"}
  bench dpo_live train --objective dpo --model "$small" --batch 4 --prompt-len 64 --completion-len 64 \
    --reference live --compare-trl ${repeats[@]+"${repeats[@]}"}
  bench dpo_precomputed train --objective dpo --model "$small" --batch 4 --prompt-len 64 --completion-len 64 \
    --reference precomputed --compare-trl ${repeats[@]+"${repeats[@]}"}
  bench rm train --objective rm --model "$small" --batch 4 --prompt-len 64 --completion-len 64 --compare-trl \
    ${repeats[@]+"${repeats[@]}"}
  bench rollout_sample rollout --model "$small" --batch 16 --prompt-len 64 --new-tokens 128 --sample \
    --compare-hf ${repeats[@]+"${repeats[@]}"}
  bench rollout_greedy rollout --model "$small" --batch 16 --prompt-len 64 --new-tokens 128 --compare-hf \
    ${repeats[@]+"${repeats[@]}"}
  bench grpo train --objective grpo --model "$small" --prompts 4 --group 4 --prompt-len 64 --new-tokens 64 \
    --compare-trl ${repeats[@]+"${repeats[@]}"}
  bench serve serve --model "$small" --streams 1,8,32 --prompt-len 64 --new-tokens 64 \
    ${repeats[@]+"${repeats[@]}"}
  bench serve_uneven serve --model "$small" --streams 1,8,32 --prompt-len 64 --new-tokens 64 --uneven \
    --requests-per-stream 4 ${repeats[@]+"${repeats[@]}"}
fi

table=("$python" "$root/scripts/bench_table.py" "$out" --out "$out/table.md")
if ((dry_run)); then
  show "${table[@]}"
  exit 0
fi
"${table[@]}"
if ((${#skipped[@]})); then
  echo "scripts/bench_all.sh: skipped, the ${budget}s budget spent (left out of the table): ${skipped[*]}" >&2
fi
if ((${#failed[@]})); then
  echo "scripts/bench_all.sh: failed (left out of the table): ${failed[*]}" >&2
fi
if ((${#failed[@]} + ${#skipped[@]})); then exit 1; fi
