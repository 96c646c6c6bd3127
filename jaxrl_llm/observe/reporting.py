"""Where metrics go beside TensorBoard and ``metrics.jsonl``: ``observe.report_to`` and its Weights & Biases run.

``Reporting.from_config(cfg)`` reads the ``observe.*`` keys and refuses, before anything is built, a
``report_to`` naming an unknown logger or ``wandb`` without the package installed. ``WandbRun`` is what a
``MetricWriter`` forwards to: scalars, histograms, text and sampled completions, against a ``step`` metric
of its own (``define_metric``) rather than W&B's step counter, so that the steps a resumed or rolled-back run
logs again are kept instead of dropped as out of order. The run's id is stored in ``<run_dir>/wandb_run_id``,
so a resumed run continues the same W&B run (``resume="allow"``); the files go under ``<run_dir>/wandb``.
In the default ``offline`` mode nothing leaves the machine (``wandb sync <run_dir>/wandb/offline-run-*``
uploads it later).
"""

from __future__ import annotations

import dataclasses
import html
import importlib.util
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxrl_llm.errors import UserError

REPORTERS = ("tensorboard", "wandb")  # TensorBoard is always on; the others are optional
WANDB_MODES = ("offline", "online", "disabled")
WANDB_ID_FILE = "wandb_run_id"
STEP_KEY = "step"  # the x-axis of every W&B chart (a metric may not use it: metrics.RESERVED_KEYS)


def parse_report_to(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"wandb"``, ``"tensorboard,wandb"`` or a list of names -> the loggers, TensorBoard first and always."""
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    unknown = [n for n in names if n not in REPORTERS]
    if unknown:
        raise UserError(
            f"observe.report_to={value!r}: unknown logger {unknown[0]!r}; choose from "
            + ", ".join(repr(r) for r in REPORTERS)
            + " (comma-separated, e.g. observe.report_to=wandb)"
        )
    return tuple(dict.fromkeys(["tensorboard", *names]))


def require_wandb() -> None:
    """A UserError saying how to install wandb when it is missing."""
    if importlib.util.find_spec("wandb") is None:
        raise UserError(
            "observe.report_to includes 'wandb' but the wandb package is not installed: pip install wandb "
            "(or pip install 'jaxrl_llm[wandb]'), or drop wandb from observe.report_to"
        )


@dataclasses.dataclass(frozen=True)
class Reporting:
    """The ``observe.*`` keys a ``MetricWriter`` reads: its loggers and the W&B run's mode and project."""

    report_to: tuple[str, ...] = ("tensorboard",)
    wandb_project: str = "jaxrl_llm"
    wandb_mode: str = "offline"

    @property
    def wandb(self) -> bool:
        return "wandb" in self.report_to

    @classmethod
    def from_config(cls, cfg: Any) -> Reporting:
        """From a config's ``observe`` section; raises UserError for an unknown logger or a missing wandb."""
        o = cfg.observe
        reporting = cls(parse_report_to(o.report_to), str(o.wandb_project), str(o.wandb_mode))
        if reporting.wandb_mode not in WANDB_MODES:
            raise UserError(f"observe.wandb_mode={reporting.wandb_mode!r}: must be one of {WANDB_MODES}")
        if reporting.wandb:
            require_wandb()
        return reporting


def stable_run_id(run_dir: Path) -> str:
    """The W&B run id of ``run_dir``: read from ``<run_dir>/wandb_run_id``, written there the first time."""
    path = run_dir / WANDB_ID_FILE
    if path.exists():
        run_id = path.read_text(encoding="utf-8").strip()
        if run_id:
            return run_id
    run_id = secrets.token_hex(4)
    path.write_text(run_id + "\n", encoding="utf-8")
    return run_id


def nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``, so the W&B config groups keys by section."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = str(key).split(".")
        node = tree
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):  # a key that is both a value and a section: keep it flat
                node, leaf = tree, str(key)
                break
            node = child
        node[leaf] = value
    return tree


class WandbRun:
    """A W&B run beside a ``MetricWriter``: ``log`` scalars, ``histogram``, ``text`` and ``table``, each at
    its ``step``; ``close`` finishes the run (the writer's ``close`` calls it).

    Args:
      run_dir: the run directory (W&B writes ``<run_dir>/wandb``; the run id lives in it).
      reporting: mode and project.
      config: the run's config (flat dotted keys or nested), shown as the W&B run's config.
    """

    def __init__(self, run_dir: str | Path, reporting: Reporting, config: Mapping[str, Any] | None = None):
        require_wandb()
        import wandb

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._wandb = wandb
        try:
            self._run = wandb.init(
                mode=reporting.wandb_mode,
                project=reporting.wandb_project,
                dir=str(run_dir),
                name=run_dir.name,
                config=nested(config or {}),
                resume="allow",
                id=stable_run_id(run_dir),
            )
        except Exception as err:  # wandb's own errors (no login for online mode, ...): not a traceback
            raise UserError(
                f"observe.report_to=wandb: wandb.init failed ({type(err).__name__}: {err}); "
                "observe.wandb_mode=offline needs no account or network"
            ) from err
        self._run.define_metric(STEP_KEY)
        self._run.define_metric("*", step_metric=STEP_KEY)

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        if self._run is not None:
            self._run.log({STEP_KEY: int(step), **values})

    def histogram(self, step: int, tag: str, values: np.ndarray) -> None:
        self.log(step, {tag: self._wandb.Histogram(np.asarray(values))})

    def text(self, step: int, tag: str, text: str) -> None:
        self.log(step, {tag: self._wandb.Html(f"<pre>{html.escape(text)}</pre>")})

    def table(self, step: int, tag: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Rows of dicts (sampled completions) as one W&B table; values other than numbers become text."""
        columns = list(dict.fromkeys(k for row in rows for k in row))
        data = [[_cell(row.get(c)) for c in columns] for row in rows]
        self.log(step, {tag: self._wandb.Table(columns=columns, data=data)})

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
