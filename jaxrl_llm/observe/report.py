"""PNG plots and a one-page HTML report of one or more training runs, from their run directories.

A run directory's ``metrics.jsonl`` (see :mod:`jaxrl_llm.observe.metrics`) is the only source of curves; the
panels are chosen from the metric names a run logged, grouped into families (loss; reward and its components;
KL; entropy; clip fractions; completion length; learning rate; accuracy; throughput; ...; one panel per family
of evaluation metrics), so a stage that logs new names gets plots without a change here. Several runs are
overlaid on the same panels, one colour per run. ``summary.json``, ``run_info.json`` and ``train_config.json``
fill the HTML page's tables (:mod:`jaxrl_llm.observe.report_html`).

matplotlib is imported inside the functions that draw, and draws on its Agg canvas without pyplot, so no global
backend or figure state is touched (safe in a training process and in threads).
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jaxrl_llm.errors import UserError

METRICS_NAME = "metrics.jsonl"
REPORT_DIRNAME = "report"  # write_plots' output folder inside a run directory
HTML_NAME = "report.html"
SMOOTH_MIN_POINTS = 10  # fewer points than this are drawn as they are (with markers when few)
MARKER_MAX_POINTS = 20
MAX_POINTS = 2000  # drawn per curve (see _thin)
LINESTYLES = ("-", "--", ":", "-.")

# Counters, not learning curves: read, never plotted.
_IGNORED = frozenset(
    {
        "batches",
        "samples",
        "target_tokens",
        "tokens",
        "loss_tokens",
        "tokens_seen",
        "completion/tokens",
        "flops",
    }
)
# Families in page order: (panel name, title). Unmatched names get a panel per first path component, after these.
_FAMILIES = (
    ("loss", "loss"),
    ("reward", "reward (mean: total and components)"),
    ("reward_groups", "reward spread within groups"),
    ("reward_errors", "reward errors"),
    ("preference_rewards", "implicit rewards"),
    ("kl", "KL"),
    ("entropy", "entropy"),
    ("clip", "clip fractions"),
    ("completion_length", "completion length (tokens)"),
    ("learning_rate", "learning rate"),
    ("grad_norm", "gradient norm (before clipping)"),
    ("accuracy", "accuracy"),
    ("throughput", "throughput (tokens/s)"),
    ("mfu", "MFU"),
    ("time", "time (s)"),
)
_TITLES = dict(_FAMILIES)
_LOG_PANELS = frozenset({"loss", "eval_loss"})  # log scale when the curve spans over two decades


class ReportError(UserError):
    """A run directory that cannot be reported on (missing, or without ``metrics.jsonl``)."""


@dataclass
class Run:
    """One run directory read back: ``series`` maps a metric name (evaluation ones prefixed ``eval/``) to
    ``(steps int64[N], values float64[N])`` sorted by step, non-finite values as NaN/inf."""

    path: Path
    label: str
    series: dict[str, tuple[np.ndarray, np.ndarray]]
    summary: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    non_finite: dict[str, int] = field(default_factory=dict)  # metric name: values logged as nan/inf
    bad_lines: int = 0  # lines that are not JSON objects (a run killed mid-write leaves a partial one)


@dataclass(frozen=True)
class Panel:
    """One plot: ``name`` is the PNG's file stem, ``keys`` the metric names drawn on it."""

    name: str
    title: str
    keys: tuple[str, ...]


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    if value in ("nan", "inf", "-inf"):  # metrics.jsonl's non-finite floats
        return float(value)
    return None


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ``{}`` when it is missing or unreadable (the report shows what it has)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_metrics(path: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
    """``(series, bad_lines)`` from a ``metrics.jsonl``: train metrics by name, evaluation ones as ``eval/<name>``
    (other splits as ``<split>/<name>``); a step logged twice (a resumed run) keeps its last value."""
    points: dict[str, dict[int, float]] = {}
    bad = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (ValueError, TypeError, KeyError):
                bad += 1
                continue
            split = record.get("split", "train")
            if split == "text":
                continue
            for name, raw in record.items():
                value = _number(raw)
                if name in ("step", "split", "time") or value is None:
                    continue
                if split != "train" and not name.startswith(f"{split}/"):
                    name = f"{split}/{name}"
                points.setdefault(name, {})[step] = value
    series = {}
    for name, by_step in points.items():
        steps = np.array(sorted(by_step), dtype=np.int64)
        series[name] = (steps, np.array([by_step[s] for s in steps], dtype=np.float64))
    return series, bad


def load_run(run_dir: str | Path, label: str | None = None) -> Run:
    """Reads a run directory; :class:`ReportError` when it is missing or has no ``metrics.jsonl``."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ReportError(f"run directory {str(path)!r} does not exist")
    metrics = path / METRICS_NAME
    if not metrics.is_file():
        raise ReportError(f"{str(path)!r} has no {METRICS_NAME}: is it a training run directory?")
    series, bad = read_metrics(metrics)
    non_finite = {k: int((~np.isfinite(v)).sum()) for k, (_, v) in series.items()}
    return Run(
        path=path,
        label=label or path.resolve().name,
        series=series,
        summary=read_json(path / "summary.json"),
        info=read_json(path / "run_info.json"),
        config=read_json(path / "train_config.json"),
        non_finite={k: n for k, n in non_finite.items() if n},
        bad_lines=bad,
    )


def run_labels(paths: list[Path]) -> list[str]:
    """Each run's folder name, or its path as given when two runs share a name."""
    names = [p.resolve().name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def family(name: str) -> tuple[str, str] | None:
    """``(panel name, title)`` of a metric name, or None for counters that are not plotted."""
    if name.startswith("eval/"):
        inner = family(name.removeprefix("eval/"))
        return None if inner is None else (f"eval_{inner[0]}", f"eval: {inner[1]}")
    if name in _IGNORED:
        return None
    parts = name.split("/")
    head, leaf = parts[0], parts[-1]
    if head == "reward":
        if leaf in ("min", "max", "std", "applies"):  # std is drawn as a band around the mean
            return None
        kind = {"group_std": "reward_groups", "zero_std_groups": "reward_groups", "errors": "reward_errors"}
        panel = kind.get(leaf, "reward")
    elif head == "rewards":  # preference stages' implicit rewards
        panel = "accuracy" if leaf == "accuracies" else "preference_rewards"
    elif name == "loss" or head == "loss" or leaf.endswith("loss"):
        panel = "loss"
    elif head == "kl":
        panel = "kl"
    elif head == "entropy":
        panel = "entropy"
    elif "clip" in leaf or head.startswith("clip"):
        panel = "clip"
    elif head == "completion" and leaf.startswith("length"):
        panel = "completion_length"
    elif name in ("learning_rate", "grad_norm", "mfu"):
        panel = name
    elif leaf in ("token_accuracy", "exact_match", "accuracy"):
        panel = "accuracy"
    elif name == "tokens_per_s":
        panel = "throughput"
    elif name == "step_s" or head == "time":
        panel = "time"
    else:
        return re.sub(r"[^A-Za-z0-9_.-]", "_", head), head
    return panel, _TITLES[panel]


def panels(runs: list[Run]) -> list[Panel]:
    """The panels the runs' metrics fill: known families in a fixed order, then the others by name; train
    panels before evaluation ones. Keys keep the order the first run logged them in."""
    keys: dict[tuple[str, str], list[str]] = {}
    for run in runs:
        for name, (_, values) in run.series.items():
            fam = family(name)
            if fam is None or not np.isfinite(values).any():
                continue
            if name not in keys.setdefault(fam, []):
                keys[fam].append(name)
    order = {name: i for i, (name, _) in enumerate(_FAMILIES)}

    def rank(fam: tuple[str, str]) -> tuple:
        name = fam[0]
        is_eval = name.startswith("eval_")
        base = name.removeprefix("eval_") if is_eval else name
        return (is_eval, order.get(base, len(order)), base)

    return [Panel(name, title, tuple(keys[(name, title)])) for name, title in sorted(keys, key=rank)]


def auto_smoothing(points: int) -> float:
    """The EMA weight for a curve of ``points`` points, LLaMA-Factory's ``smooth`` rule: light for short
    runs (0.34 at 16 points), TensorBoard's 0.6 at 30 points, close to 0.9 from about 100."""
    return min(0.9, 1.8 * (1.0 / (1.0 + math.exp(-0.05 * points)) - 0.5))


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's smoothing: a debiased exponential moving average that steps over non-finite values
    (they stay non-finite in the output, so the curve shows the gap)."""
    out = np.full(values.shape, np.nan)
    last, count = 0.0, 0
    for i, v in enumerate(values):
        if not math.isfinite(v):
            continue
        last = last * weight + (1.0 - weight) * v
        count += 1
        out[i] = last / (1.0 - weight**count)
    return out


def _display(key: str) -> str:
    return key.removeprefix("eval/").removesuffix("/mean")


def _thin(n: int) -> np.ndarray:
    """Indices of at most about ``MAX_POINTS`` evenly spaced points of ``n``, the last included: a long run's
    curves are drawn from a subsample (Agg's time grows with the points; a PNG cannot show more)."""
    every = max(1, math.ceil(n / MAX_POINTS))
    return np.unique(np.r_[np.arange(0, n, every), n - 1]) if n else np.arange(0)


def _draw_series(ax: Any, steps, values, std, smoothing: float | None, **style: Any) -> None:
    """One curve: raw values faint with the EMA over them, or (short curves) the values with markers; a
    ±``std`` band when given."""
    finite = int(np.isfinite(values).sum())
    weight = auto_smoothing(finite) if smoothing is None else smoothing
    smooth = ema(values, weight) if weight > 0 and finite >= SMOOTH_MIN_POINTS else None
    keep = _thin(len(steps))
    steps, values = steps[keep], values[keep]
    if std is not None:
        std = std[keep]
        ax.fill_between(steps, values - std, values + std, color=style["color"], alpha=0.12, lw=0)
    if smooth is not None:
        faint = {k: v for k, v in style.items() if k != "label"}
        ax.plot(steps, values, alpha=0.25, lw=1, **faint)
        ax.plot(steps, smooth[keep], lw=1.6, **style)
    else:
        ax.plot(steps, values, marker="o" if finite <= MARKER_MAX_POINTS else None, ms=4, lw=1.6, **style)


def _draw(ax: Any, panel: Panel, runs: list[Run], smoothing: float | None) -> bool:
    """Draws the panel's curves on ``ax``, one colour per key (one run) or per run (several; one line style
    per key); False when no run has a finite point for it."""
    drew = False
    for r, run in enumerate(runs):
        for k, key in enumerate(panel.keys):
            if key not in run.series:
                continue
            steps, values = run.series[key]
            values = np.where(np.isinf(values), np.nan, values)  # inf would flatten the autoscaled axis
            if not np.isfinite(values).any():
                continue
            drew = True
            if len(runs) == 1:
                colour, line, label = f"C{k % 10}", "-", _display(key)
            else:
                colour, line = f"C{r % 10}", LINESTYLES[k % len(LINESTYLES)]
                label = run.label if len(panel.keys) == 1 else f"{run.label}: {_display(key)}"
            std = None
            if key.endswith("/mean") and key.removesuffix("/mean") + "/std" in run.series:
                std_steps, std = run.series[key.removesuffix("/mean") + "/std"]
                std = std if np.array_equal(std_steps, steps) else None
            _draw_series(ax, steps, values, std, smoothing, color=colour, linestyle=line, label=label)
    return drew


def _log_scale(panel: Panel, runs: list[Run]) -> bool:
    if panel.name not in _LOG_PANELS:
        return False
    values = np.concatenate([run.series[k][1] for run in runs for k in panel.keys if k in run.series])
    values = values[np.isfinite(values)]
    return values.size > 1 and bool((values > 0).all()) and values.max() / values.min() > 100


def plot_panel(panel: Panel, runs: list[Run], path: Path, smoothing: float | None = None) -> Path | None:
    """Writes the panel as a PNG at ``path``; None (nothing written) when it has no finite point.

    ``smoothing``: the EMA weight of the solid curves drawn over the faint logged ones (0: none), or None for
    :func:`auto_smoothing` of each curve's length."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if not _draw(ax, panel, runs, smoothing):
        return None
    if _log_scale(panel, runs):
        ax.set_yscale("log")
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.92)  # fixed: tight_layout draws twice
    fig.savefig(path, format="png")
    return path


def render(
    runs: list[Run], out_dir: str | Path, smoothing: float | None = None, html: bool = True
) -> list[Path]:
    """Writes one PNG per panel (``<panel>.png``) and, with ``html``, ``report.html`` into ``out_dir``;
    returns the files written, the page last."""
    from .report_html import write_html

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    drawn = []
    for panel in panels(runs):
        if plot_panel(panel, runs, out / f"{panel.name}.png", smoothing) is not None:
            drawn.append(panel)
    written = [out / f"{p.name}.png" for p in drawn]
    if html:
        written.append(write_html(runs, drawn, out / HTML_NAME))
    return written


def write_report(
    run_dirs: list[str | Path], out_dir: str | Path, smoothing: float | None = None
) -> list[Path]:
    """The runs' plots and ``report.html`` in ``out_dir`` (the runs overlaid); :class:`ReportError` for a
    directory that is not a run. Returns the files written, ``report.html`` last."""
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, label) for p, label in zip(paths, run_labels(paths), strict=True)]
    return render(runs, out_dir, smoothing)


def write_plots(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """The end-of-run report: ``<run_dir>/report/<panel>.png`` for every panel the run's metrics fill, and
    ``report.html`` beside them. Returns the files written (``report.html`` last).

    Never raises: a run with no metrics yet writes nothing and returns ``[]``, and any failure is printed as a
    one-line warning on stderr (a plot must never fail a finished training run)."""
    try:
        run_dir = Path(run_dir)
        if not (run_dir / METRICS_NAME).is_file():
            return []
        out = run_dir / REPORT_DIRNAME if out_dir is None else Path(out_dir)
        return write_report([run_dir], out)
    except Exception as err:  # noqa: BLE001 - reporting is best effort after training succeeded
        print(f"warning: could not write the plots of {str(run_dir)!r}: {err!r}", file=sys.stderr)
        return []
