"""``python -m jaxrl_llm.bench``: throughput measurements, never asserted by tests.

    python -m jaxrl_llm.bench peak
    python -m jaxrl_llm.bench forward --model llama-30m --batch 8 --seq-len 256 [--compare-hf] [--json OUT]
    python -m jaxrl_llm.bench rollout --model llama-30m --batch 16 --prompt-len 64 --new-tokens 128 [--max-len 2048] \
        [--compare-hf]
    python -m jaxrl_llm.bench serve --model llama-30m --streams 1,8,32 --prompt-len 64 --new-tokens 64 [--uneven --requests-per-stream 4] [--json OUT]
    python -m jaxrl_llm.bench train --objective sft --model llama-30m --batch 8 --seq-len 256 [--compare-trl] [--json OUT]
    python -m jaxrl_llm.bench train --objective dpo --model llama-30m --batch 4 --prompt-len 64 --completion-len 64 \
        [--reference live|precomputed] [--compare-trl] [--json OUT]
    python -m jaxrl_llm.bench train --objective rm --model llama-30m --batch 4 --prompt-len 64 --completion-len 64 \
        [--compare-trl] [--json OUT]
    python -m jaxrl_llm.bench train --objective grpo --model llama-30m --prompts 4 --group 4 --prompt-len 64 \
        --new-tokens 64 [--dtype bfloat16] [--rollout-dtype bfloat16] [--compare-trl] [--json OUT]
    python -m jaxrl_llm.bench memory --preset llama3.1-8b --mesh data=1,fsdp=8,tensor=1 --stage sft --batch 8 \
        --seq-len 2048 [--lora] [--remat none|full|dots] [--param-dtype bfloat16] [--no-compile] [--json OUT]

``--model`` is a preset name (random weights) or an HF checkpoint directory. For ``train``, ``--batch`` counts
rows for ``sft`` and preference pairs for ``dpo`` and ``rm`` (each side prompt + completion tokens, all counted);
``grpo`` takes ``--prompts`` x ``--group`` completions of ``--new-tokens`` each per iteration instead.
``memory`` times nothing: it plans the bytes per device of any training stage (``--stage sft`` ... ``ppo``) from
shapes and a compile for simulated CPU devices (``jaxrl_llm.bench.memory``; its RL stages take ``--batch``
prompts, ``--prompt-len``, ``--new-tokens`` and ``--group``; docs/memory.md).
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import EXIT_USER_ERROR, UserError
from .forward import bench_forward
from .memory_cli import add_arguments as add_memory_arguments
from .peak import machine_peaks
from .train import (
    DEFAULT_COMPLETION_LEN,
    DEFAULT_PROMPT_LEN,
    DEFAULT_SEQ_LEN,
    OBJECTIVES,
    REFERENCES,
    bench_train,
    check_train_args,
)


def _print(result: dict) -> None:
    width = max(map(len, result))
    for key, value in result.items():
        shown = f"{value:,.4g}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxrl_llm.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    peak = sub.add_parser("peak", help="this machine's matmul FLOP/s and copy bandwidth")
    peak.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    fwd = sub.add_parser("forward", help="prefill/forward tokens per second of a model")
    fwd.add_argument("--model", default="llama-30m", help="preset name or HF checkpoint directory")
    fwd.add_argument("--batch", type=int, default=8)
    fwd.add_argument("--seq-len", type=int, default=256)
    fwd.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    fwd.add_argument("--repeats", type=int, default=5)
    fwd.add_argument("--compare-hf", action="store_true", help="also run HF transformers (PyTorch) forward")
    train = sub.add_parser("train", help="training-step tokens per second (jitted step, AdamW)")
    train.add_argument("--objective", default="sft", choices=OBJECTIVES)
    train.add_argument("--model", default="llama-30m", help="preset name or HF checkpoint directory")
    train.add_argument("--batch", type=int, default=8, help="rows (sft) or preference pairs (dpo, rm)")
    train.add_argument("--seq-len", type=int, help=f"sft only: row length (default {DEFAULT_SEQ_LEN})")
    train.add_argument(
        "--prompt-len", type=int, help=f"dpo, rm: prompt tokens of a pair (default {DEFAULT_PROMPT_LEN})"
    )
    train.add_argument(
        "--completion-len",
        type=int,
        help=f"dpo, rm: completion tokens of each side (default {DEFAULT_COMPLETION_LEN})",
    )
    train.add_argument(
        "--reference",
        choices=REFERENCES,
        help="dpo only: the frozen reference's log-probs run before every step (live, the default) "
        "or once up front (precomputed)",
    )
    train.add_argument("--prompts", type=int, default=4, help="grpo: prompts an iteration")
    train.add_argument("--group", type=int, default=4, help="grpo: completions per prompt")
    train.add_argument("--new-tokens", type=int, default=64, help="grpo: tokens of every completion")
    train.add_argument(
        "--rollout-dtype",
        choices=("float32", "bfloat16"),
        help="grpo: the rollouts' compute dtype (default --dtype)",
    )
    train.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    train.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
    train.add_argument("--accum", type=int, default=1, help="gradient-accumulation micro-batches")
    train.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    train.add_argument("--repeats", type=int, default=5)
    train.add_argument(
        "--compare-trl",
        action="store_true",
        help="also run TRL's trainer for the objective (SFTTrainer, DPOTrainer, RewardTrainer, GRPOTrainer; "
        "PyTorch, CPU) "
        "on the same weights and token ids",
    )
    roll = sub.add_parser("rollout", help="generation tokens per second of the in-graph sampler")
    roll.add_argument("--model", default="llama-30m", help="preset name or HF checkpoint directory")
    roll.add_argument("--batch", type=int, default=16)
    roll.add_argument("--prompt-len", type=int, default=64)
    roll.add_argument("--new-tokens", type=int, default=128)
    roll.add_argument(
        "--max-len",
        type=int,
        help="KV cache slots (default: what the sampler allocates, the prompt's power-of-two bucket + "
        "--new-tokens); a longer cache measures decode on a cache sized for longer requests than these",
    )
    roll.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    roll.add_argument("--sample", action="store_true", help="temperature-1 sampling instead of greedy")
    roll.add_argument("--repeats", type=int, default=3)
    roll.add_argument("--compare-hf", action="store_true", help="also run HF transformers generate")
    serve = sub.add_parser(
        "serve", help="continuous-batching tokens/s and time to first token at N concurrent streams"
    )
    serve.add_argument("--model", default="llama-30m", help="preset name or HF checkpoint directory")
    serve.add_argument("--streams", default="1,8,32", help="concurrent streams, comma-separated")
    serve.add_argument("--prompt-len", type=int, default=64)
    serve.add_argument("--new-tokens", type=int, default=64)
    serve.add_argument("--slots", type=int, help="engine slots (default: the largest --streams)")
    serve.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    serve.add_argument("--repeats", type=int, default=2)
    serve.add_argument(
        "--uneven", action="store_true", help="answer budgets drawn from [N/8, N] instead of all N"
    )
    serve.add_argument(
        "--requests-per-stream", type=int, default=1, help="requests each stream sends one after the other"
    )
    memory = sub.add_parser("memory", help="bytes per device of a training stage, planned from shapes")
    add_memory_arguments(memory)
    for p in (peak, fwd, train, roll, serve, memory):
        p.add_argument("--json", metavar="OUT", help="also write the result as one JSON object")
    args = parser.parse_args(argv)
    try:
        result = _run(args)
    except UserError as err:  # a bad --model name or path: one line, no traceback
        print(f"jaxrl_llm.bench: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except _ArgumentError as err:  # flags of `train` that do not go together: its usage, exit status 2
        train.error(str(err))
    if args.command == "memory":
        from .memory_cli import format_table

        print(format_table(result))
    else:
        _print(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


class _ArgumentError(ValueError):
    """Arguments that parse but do not go together: argparse's usage message and exit status 2."""


def _flag(name: str) -> str:
    """A ``bench_train`` argument as the command line spells it."""
    return {"accum_steps": "--accum"}.get(name, "--" + name.replace("_", "-"))


def _run(args: argparse.Namespace) -> dict:
    if args.command == "peak":
        import jax.numpy as jnp

        return machine_peaks(jnp.dtype(args.dtype))
    if args.command == "memory":
        from .memory_cli import run_memory

        return run_memory(args)
    if args.command == "serve":
        from .serve import bench_serve

        try:
            streams = tuple(int(s) for s in args.streams.split(","))
        except ValueError:
            raise UserError(f"--streams {args.streams!r}: expected comma-separated integers") from None
        if args.requests_per_stream < 1:
            raise UserError(f"--requests-per-stream must be >= 1, got {args.requests_per_stream}")
        if not streams or min(streams) < 1:
            raise UserError(f"--streams {args.streams!r}: every count must be >= 1")
        return bench_serve(
            args.model,
            streams=streams,
            prompt_len=args.prompt_len,
            new_tokens=args.new_tokens,
            slots=args.slots,
            dtype=args.dtype,
            repeats=args.repeats,
            uneven=args.uneven,
            waves=args.requests_per_stream,
        )
    if args.command == "rollout":
        from .rollout import bench_rollout

        return bench_rollout(
            args.model,
            batch=args.batch,
            prompt_len=args.prompt_len,
            new_tokens=args.new_tokens,
            max_len=args.max_len,
            dtype=args.dtype,
            sample=args.sample,
            compare_hf=args.compare_hf,
            repeats=args.repeats,
        )
    if args.command == "train":
        try:
            check_train_args(
                args.objective,
                seq_len=args.seq_len,
                prompt_len=args.prompt_len,
                completion_len=args.completion_len,
                reference=args.reference,
                compare_trl=args.compare_trl,
                accum_steps=args.accum,
                remat=args.remat,
                flag=_flag,
            )
        except ValueError as err:
            raise _ArgumentError(str(err)) from err
        if args.objective == "grpo":
            from .rl import bench_grpo

            return bench_grpo(
                args.model,
                prompts=args.prompts,
                group=args.group,
                prompt_len=args.prompt_len or DEFAULT_PROMPT_LEN,
                new_tokens=args.new_tokens,
                dtype=args.dtype,
                param_dtype=args.param_dtype,
                rollout_dtype=args.rollout_dtype,
                repeats=args.repeats,
                compare_trl=args.compare_trl,
            )
        return bench_train(
            args.model,
            objective=args.objective,
            batch=args.batch,
            seq_len=args.seq_len,
            prompt_len=args.prompt_len,
            completion_len=args.completion_len,
            reference=args.reference,
            dtype=args.dtype,
            param_dtype=args.param_dtype,
            accum_steps=args.accum,
            remat=args.remat,
            repeats=args.repeats,
            compare_trl=args.compare_trl,
        )
    return bench_forward(
        args.model,
        batch=args.batch,
        seq_len=args.seq_len,
        dtype=args.dtype,
        repeats=args.repeats,
        compare_hf=args.compare_hf,
    )


if __name__ == "__main__":
    sys.exit(main())
