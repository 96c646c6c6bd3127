"""``python -m jaxrl_llm.chat CHECKPOINT [--system TEXT] [--temperature T] [--top-p P] [--top-k K]
[--max-tokens N] [--seed S] [--prompt TEXT]``.

CHECKPOINT is a training run's directory (its ``final/`` export and the chat template it trained with) or
an HF checkpoint directory. Without ``--prompt``: an interactive chat; each line you type is a user turn,
the answer streams as it is generated, and the conversation is kept (``/reset`` clears it, ``/system TEXT``
sets the system prompt, ``/system`` alone removes it, ``/exit`` or end of input quits, Ctrl-C stops an
answer). With ``--prompt TEXT``: prints the answer to that one message and exits. Greedy by default
(``--temperature 0``), the answer training's evaluation sees. Exit codes: 0, or 2 for a usage mistake or a
checkpoint that cannot be loaded (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

PROG = "jaxrl_llm.chat"
HELP = "commands: /reset (new conversation), /system TEXT (system prompt; /system alone removes it), /exit"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[1])
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a training run's directory or an HF checkpoint")
    p.add_argument("--prompt", metavar="TEXT", help="answer this one message, print the answer and exit")
    p.add_argument("--system", metavar="TEXT", help="system prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1: off)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (default 0: off)")
    p.add_argument(
        "--max-tokens", type=int, metavar="N", help="answer budget (default: the rest of the context)"
    )
    p.add_argument("--seed", type=int, help="sampling seed (default: a fresh one per answer)")
    p.add_argument("--max-len", type=int, metavar="N", help="context: prompt + answer (default: the model's)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="parameter dtype")
    return p


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _interactive(session, name: str) -> int:
    from jaxrl_llm.serve.schemas import APIError

    print(f"chatting with {name}; {HELP}", file=sys.stderr, flush=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            print("(conversation cleared)", file=sys.stderr, flush=True)
            continue
        if text == "/system" or text.startswith("/system "):
            session.system = text[len("/system") :].strip() or None
            print(f"(system prompt {'set' if session.system else 'removed'})", file=sys.stderr, flush=True)
            continue
        if text.startswith("/") and text.split()[0] in ("/help", "/?"):
            print(HELP, file=sys.stderr, flush=True)
            continue
        try:
            _, reason = session.ask(line, _write)
            _write("\n")
            if reason == "length":
                print("(the answer reached its token budget)", file=sys.stderr, flush=True)
        except APIError as err:
            print(f"error: {err.message} (/reset starts a new conversation)", file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            _write("\n")
            print("(answer stopped)", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from jaxrl_llm.errors import EXIT_USER_ERROR, UserError

    if args.max_tokens is not None and args.max_tokens < 1:
        print(f"{PROG}: --max-tokens must be >= 1, got {args.max_tokens}", file=sys.stderr)
        return EXIT_USER_ERROR
    from jaxrl_llm.chat.session import ChatSession
    from jaxrl_llm.rollout.sampling import SamplingParams
    from jaxrl_llm.serve.schemas import APIError
    from jaxrl_llm.serve.service import Service, Settings

    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    try:
        sampling.validate()
        service = Service.load(args.checkpoint, dtype=args.dtype, slots=1, max_len=args.max_len, timeout=1e9)
    except (UserError, OSError, ValueError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    service.start(warmup=False)
    try:
        session = ChatSession(service, Settings(args.max_tokens, sampling, seed=args.seed), args.system)
        if args.prompt is None:
            return _interactive(session, service.name)
        try:
            session.ask(args.prompt, _write)
        except APIError as err:
            print(f"{PROG}: {err.message}", file=sys.stderr)
            return EXIT_USER_ERROR
        _write("\n")
        return 0
    finally:
        service.stop()


if __name__ == "__main__":
    raise SystemExit(main())
