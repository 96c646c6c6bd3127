"""``python -m jaxrl_llm.reward``: the registered reward functions, their kind, parameters and purpose."""

from __future__ import annotations

import sys
import textwrap

from . import REGISTRY


def main() -> int:
    for name, fn in sorted(REGISTRY.items()):
        if name.startswith("_"):
            continue
        params = ", ".join(f"{k}={v!r}" for k, v in fn.defaults.items()) or "no params"
        print(f"{name} ({fn.kind}): {params}")
        print(textwrap.indent(textwrap.fill(" ".join(fn.doc.split()), 100), "    "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
