"""Every third-party module the package imports is a declared runtime dependency.

A module that the test extra happens to bring (jinja2 arrives with torch) would pass the suite and then
fail `make quickstart` on a fresh machine; this test catches that class of mistake.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Imported only on request, with a clear message when missing (HF `datasets` readers, the HF side of
# `bench --compare-hf`): optional by design, and installed by the test extra.
OPTIONAL = {"datasets", "torch", "trl", "wandb"}


def _imported_top_level_modules() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "jaxrl_llm").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    # The sandbox's child runs as a script outside the package and imports its sibling files by name.
    own = {path.stem for path in (ROOT / "jaxrl_llm").rglob("*.py")}
    return names - set(sys.stdlib_module_names) - own - {"jaxrl_llm", "__future__"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_package_is_a_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_normalise(re.split(r"[<>=!~ \[;]", req, maxsplit=1)[0]) for req in project["dependencies"]}
    owners = packages_distributions()
    missing = {}
    for module in sorted(_imported_top_level_modules()):
        dists = {_normalise(d) for d in owners.get(module, [module])}
        if not dists & (declared | OPTIONAL):
            missing[module] = sorted(dists)
    assert not missing, f"imported by jaxrl_llm but not in [project].dependencies: {missing}"
