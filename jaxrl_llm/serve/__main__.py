"""``python -m jaxrl_llm.serve --checkpoint RUN_DIR_OR_HF_DIR [--host 127.0.0.1] [--port 8000]
[--served-model-name NAME] [--max-batch 32] [--max-len N] [--dtype float32|bfloat16] [--timeout SECONDS]``.

Loads the checkpoint (a training run's directory: its ``final/`` export and the chat template it trained
with; or an HF checkpoint directory: its tokenizer's template), compiles a first prefill and decode step,
and serves the OpenAI-compatible API (``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
``/health``) with uvicorn. It binds to 127.0.0.1 unless ``--host`` says otherwise. Exit codes: 0 after a
clean shutdown (Ctrl-C), 2 a usage mistake or a checkpoint that cannot be served (one line on stderr).
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence

PROG = "jaxrl_llm.serve"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[1])
    p.add_argument(
        "--checkpoint", required=True, metavar="DIR", help="a training run's directory or an HF checkpoint"
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--served-model-name", metavar="NAME", help="the model's name in the API (default: the folder's)"
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=32,
        metavar="N",
        help="engine slots: answers decoded together, and the most one request may ask for (n) (default 32)",
    )
    p.add_argument(
        "--max-len", type=int, metavar="N", help="tokens per slot, prompt + answer (default: the model's)"
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="parameter dtype (default float32)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="per-request time budget; an answer still going then ends with finish_reason 'length' (default 600)",
    )
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return p


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads (uvicorn serves on it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, reuse_port=False)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from jaxrl_llm.errors import EXIT_USER_ERROR, UserError

    for name in ("max_batch", "max_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            print(f"{PROG}: --{name.replace('_', '-')} must be >= 1, got {value}", file=sys.stderr)
            return EXIT_USER_ERROR
    if not args.timeout > 0:
        print(f"{PROG}: --timeout must be > 0, got {args.timeout}", file=sys.stderr)
        return EXIT_USER_ERROR
    if not 0 <= args.port < 65536:
        print(f"{PROG}: --port must be in [0, 65535], got {args.port}", file=sys.stderr)
        return EXIT_USER_ERROR
    try:  # the address first: a port in use is one line before minutes of loading, not uvicorn's exit 3
        sock = _listen(args.host, args.port)
    except OSError as err:
        print(f"{PROG}: cannot listen on {args.host}:{args.port}: {err.strerror or err}", file=sys.stderr)
        return EXIT_USER_ERROR
    from jaxrl_llm.serve.service import Service

    try:
        service = Service.load(
            args.checkpoint,
            dtype=args.dtype,
            name=args.served_model_name,
            slots=args.max_batch,
            max_len=args.max_len,
            timeout=args.timeout,
        )
    except (UserError, OSError) as err:
        sock.close()
        print(f"{PROG}: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    import uvicorn

    from jaxrl_llm.serve.app import create_app

    service.start()
    print(
        f"{PROG}: serving {service.name!r} ({service.renderer.template_name} template, {service.slots} slots of "
        f"{service.max_len} tokens) on http://{args.host}:{args.port}/v1",
        file=sys.stderr,
        flush=True,
    )
    try:
        config = uvicorn.Config(create_app(service), host=args.host, port=args.port, log_level=args.log_level)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        service.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
