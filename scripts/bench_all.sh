#!/usr/bin/env bash
# Reproduces the README's benchmark tables: runs each `python -m jaxrl_llm.bench ...` command they came from
# (ours against HF transformers / TRL in the same run where a table compares them), each writing its JSON
# into the output directory, then writes one markdown table of all of them (scripts/bench_table.py).
#
#   scripts/bench_all.sh [--dry-run] [--quick] [--gpu] [--out DIR]
#
#   --dry-run  print every command, one a line, and run nothing
#   --quick    the same commands on tiny models (llama-tiny, qwen2-tiny) with fewer repeats: a smoke test of
#              the pipeline, not numbers to quote
#   --gpu      the GPU rows (the README's H100 paragraph and table: bf16 peak, SFT steps in fp32 and bf16,
#              Qwen2.5-0.5B, rollouts against HF generate on the same GPU) instead of the CPU tables
#   --out DIR  where the JSON files and table.md go (default runs/bench/<date>-<time> in the checkout)
#
# The --compare-hf / --compare-trl peers need the test extra (pip install -e '.[test]': torch, trl); PYTHON
# picks the interpreter (default: the checkout's .venv/bin/python, else python3). A command that fails is
# reported and left out of the table; the script then exits 1.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() { sed -n '2,18s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

dry_run=0 quick=0 gpu=0 out=""
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --quick) quick=1 ;;
    --gpu) gpu=1 ;;
    --out) out="${2:?--out needs a directory}" && shift ;;
    --out=*) out="${1#--out=}" ;;
    -h | --help) usage && exit 0 ;;
    *) echo "scripts/bench_all.sh: unknown argument '$1'" >&2 && usage >&2 && exit 2 ;;
  esac
  shift
done
out="${out:-$root/runs/bench/$(date +%Y%m%d-%H%M%S)}"
if [[ "$out" != /* ]]; then out="$PWD/$out"; fi
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi

# Sizes: the README's, or tiny models for --quick.
small=llama-30m qwen=qwen2.5-0.5b repeats=()
if ((quick)); then
  small=llama-tiny qwen=qwen2-tiny repeats=(--repeats 2)
fi

# show ARG...: the command on one line, single-quoted where the shell would split or expand a word.
show() {
  local word words=()
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then words+=("$word"); else words+=("'${word//\'/\'\\\'\'}'"); fi
  done
  printf '%s\n' "${words[*]}"
}

count=0
failed=()
# bench NAME ARG...: `python -m jaxrl_llm.bench ARG... --json OUT/NN_NAME.json`; NN keeps the README's order.
bench() {
  local name="$1" file
  shift
  count=$((count + 1))
  file="$out/$(printf '%02d' "$count")_$name.json"
  local cmd=("$python" -m jaxrl_llm.bench "$@" --json "$file")
  if ((dry_run)); then
    show "${cmd[@]}"
  elif ! (cd "$root" && "${cmd[@]}"); then
    failed+=("$name")
  fi
}

if ((!dry_run)); then mkdir -p "$out"; fi
if ((gpu)); then
  # The README's "On one NVIDIA H100" paragraph and its rollout table.
  bench peak_bfloat16 peak --dtype bfloat16
  bench peak_float32 peak --dtype float32
  bench sft_fp32 train --objective sft --model "$small" --batch 8 --seq-len 256 ${repeats[@]+"${repeats[@]}"}
  bench sft_bf16 train --objective sft --model "$small" --batch 8 --seq-len 256 --dtype bfloat16 \
    ${repeats[@]+"${repeats[@]}"}
  bench sft_qwen_bf16 train --objective sft --model "$qwen" --batch 8 --seq-len 512 --dtype bfloat16 \
    --remat full ${repeats[@]+"${repeats[@]}"}
  bench rollout_fp32_greedy rollout --model "$small" --batch 16 --prompt-len 64 --new-tokens 128 --compare-hf \
    ${repeats[@]+"${repeats[@]}"}
  bench rollout_bf16_sample rollout --model "$small" --batch 256 --prompt-len 128 --new-tokens 256 \
    --dtype bfloat16 --sample --compare-hf ${repeats[@]+"${repeats[@]}"}
  bench rollout_qwen_bf16_sample rollout --model "$qwen" --batch 64 --prompt-len 128 --new-tokens 256 \
    --dtype bfloat16 --sample --compare-hf ${repeats[@]+"${repeats[@]}"}
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
if ((${#failed[@]})); then
  echo "scripts/bench_all.sh: failed (left out of the table): ${failed[*]}" >&2
  exit 1
fi
