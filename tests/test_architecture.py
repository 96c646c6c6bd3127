"""The package layers import downwards only: a package may import the packages below it, never one above
(no cycles between layers; training never imports the benchmarks; checkpoints know nothing of training).
Function-level imports count too. The order is the one docs/ARCHITECTURE.md shows."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jaxrl_llm"
# Foundations first; each package may import only those before it.
LAYERS = (
    "errors",
    "parallel",
    "render",
    "data",
    "models",
    "rollout",
    "reward",
    "objectives",
    "observe",
    "checkpoint",
    "config",
    "train",
    "eval",
    "runs",
    "report",
    "export",
    "sanity",
    "serve",
    "chat",
    "bench",
)


def _imports(path: Path) -> set[str]:
    """The jaxrl_llm packages a module imports (absolute or relative, at any depth of the file)."""
    parts = path.relative_to(PACKAGE).parts
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(parts[:-1])[: len(parts) - node.level]
            target = (base + (node.module.split(".") if node.module else []))[:1]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxrl_llm."):
            target = node.module.split(".")[1:2]
        elif isinstance(node, ast.Import):
            target = [a.name.split(".")[1] for a in node.names if a.name.startswith("jaxrl_llm.")][:1]
        else:
            continue
        out.update(t.removesuffix(".py") for t in target)
    return out


def test_every_package_is_in_the_layer_order():
    packages = {p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.name != "__init__.py"}
    packages -= {"__pycache__"}
    assert packages == set(LAYERS), packages ^ set(LAYERS)


def test_imports_point_down_the_layers():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).parts
        if len(rel) == 1 and rel[0] == "__init__.py":
            continue
        own = rel[0].removesuffix(".py")
        for target in _imports(path) - {own}:
            if target in rank and rank[target] > rank[own]:
                upward.append(f"{path.relative_to(PACKAGE.parent)} imports {target} (above {own})")
    assert not upward, "\n".join(upward)
