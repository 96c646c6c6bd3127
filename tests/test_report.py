"""Run reports (``jaxrl_llm.observe.report``, ``python -m jaxrl_llm.report``): the panels follow the metric names
a run logged, the PNGs hold the curves (read back pixel by pixel, in matplotlib's default colours), several
runs overlay, the page names the runs and links the plots, a run with nothing to plot never raises, the
command's mistakes exit 2 in one line, and a real training run renders."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxrl_llm.observe.report import family, load_run, panels, write_plots, write_report
from jaxrl_llm.report.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
C0, C1 = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's first two cycle colours


def _jsonable(value):
    return value if isinstance(value, int) or math.isfinite(value) else str(value)


def fake_run(
    path: Path,
    train: dict[str, list[float]],
    evals: dict[str, list[float]] | None = None,
    stage="sft",
    lr=1e-3,
) -> Path:
    """A run directory as training leaves it: ``train`` values logged at steps 10, 20, ...; ``evals`` at
    steps 0, 50, 100, ... (non-finite floats written as metrics.jsonl writes them)."""
    path.mkdir(parents=True)
    lines = []
    for i in range(max(len(v) for v in train.values())):
        values = {k: _jsonable(v[i]) for k, v in train.items() if i < len(v)}
        lines.append({"step": 10 * (i + 1), "split": "train", "time": 1.0 + i, **values})
    for i in range(max((len(v) for v in (evals or {}).values()), default=0)):
        values = {k: _jsonable(v[i]) for k, v in evals.items() if i < len(v)}
        lines.append({"step": 50 * i, "split": "eval", "time": 1.0 + i, **values})
    lines.append({"step": 10, "split": "text", "time": 1.0, "tag": "samples", "text": "<b>not a metric</b>"})
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    final_train = {k: _jsonable(v[-1]) for k, v in train.items()}
    final_eval = {k: _jsonable(v[-1]) for k, v in (evals or {}).items()}
    first_eval = {k: _jsonable(v[0]) for k, v in (evals or {}).items()}
    summary = {"stage": stage, "steps": 10 * len(train["loss"]), "updates": 10 * len(train["loss"])}
    summary |= {"final_train": final_train, "final_eval": final_eval, "first_eval": first_eval}
    (path / "summary.json").write_text(json.dumps(summary))
    info = {"model": {"family": "llama", "parameters": 854144}, "git_commit": "abc123"}
    info["data_manifests"] = {"train": {"content_hash": "0123456789abcdef" * 4}}
    (path / "run_info.json").write_text(json.dumps(info))
    config = {
        "stage": stage,
        "seed": 0,
        "model": {"preset": "llama-tiny", "path": ""},
        "optimizer": {"lr": lr},
    }
    config["rl"] = {"group_size": 4}
    (path / "train_config.json").write_text(json.dumps(config))
    return path


def sft_run(path: Path, lr=1e-3, scale=1.0) -> Path:
    loss = [scale * 3.0 * math.exp(-i / 8) + 0.05 * (i % 3) for i in range(30)]
    loss[7] = math.nan  # a NaN step: a gap in the curve, counted on the page
    train = {
        "loss": loss,
        "learning_rate": [lr * min(1.0, (i + 1) / 5) for i in range(30)],
        "grad_norm": [1.0 / (i + 1) for i in range(30)],
        "token_accuracy": [min(1.0, i / 20) for i in range(30)],
        "tokens_per_s": [1000.0 + i for i in range(30)],
        "tokens": [512.0] * 30,  # a counter: never a panel
    }
    evals = {
        "loss": [3.0, 1.0, 0.5, 0.2, 0.1, 0.05, 0.04],
        "token_accuracy": [0.1, 0.5, 0.7, 0.9, 0.95, 1.0, 1.0],
        "exact_match": [0.0, 0.1, 0.5, 0.8, 0.9, 1.0, 1.0],
    }
    return fake_run(path, train, evals, lr=lr)


def rl_run(path: Path) -> Path:
    n = 12
    train = {
        "loss": [0.1 * (-1) ** i for i in range(n)],
        "reward/total/mean": [0.2 + 0.05 * i for i in range(n)],
        "reward/total/std": [0.1] * n,
        "reward/total/min": [0.0] * n,
        "reward/total/group_std": [0.1] * n,
        "reward/math_verify/mean": [0.1 + 0.04 * i for i in range(n)],
        "reward/math_verify/errors": [0.0] * n,
        "kl": [0.01 * i for i in range(n)],
        "entropy": [1.0 - 0.05 * i for i in range(n)],
        "clip_frac/low": [0.01] * n,
        "clip_frac/high": [0.02] * n,
        "completion/length_mean": [20.0 - i for i in range(n)],
        "completion/length_max": [32.0] * n,
        "advantage/mean": [0.0] * n,
        "learning_rate": [1e-6] * n,
    }
    evals = {
        "reward/total": [0.2, 0.5, 0.7],
        "reward/math_verify": [0.1, 0.4, 0.6],
        "exact_match": [0.1, 0.4, 0.6],
    }
    return fake_run(path, train, evals, stage="grpo")


def pixels(png: Path) -> np.ndarray:
    """uint8[H, W, 3] of a PNG written by the report."""
    from matplotlib.image import imread

    image = imread(png)
    assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] >= 500, image.shape
    return np.round(image[..., :3] * 255).astype(np.int16)


def count_colour(image: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> int:
    return int((np.abs(image - np.array(rgb)).max(axis=-1) <= tol).sum())


def assert_a_curve(png: Path, colours: tuple[tuple[int, int, int], ...] = (C0,), minimum: int = 150) -> None:
    image = pixels(png)
    assert image.var() > 0, f"{png.name} is blank"
    for rgb in colours:
        assert count_colour(image, rgb) >= minimum, (png.name, rgb, count_colour(image, rgb))


def test_metric_names_fall_into_families():
    assert family("loss")[0] == family("value_loss")[0] == family("policy_loss")[0] == "loss"
    assert family("reward/total/mean")[0] == family("reward/math/mean")[0] == "reward"
    assert family("reward/total/std") is None and family("tokens") is None and family("eval/samples") is None
    assert family("reward/total/zero_std_groups")[0] == "reward_groups"
    assert family("clip_frac/low")[0] == family("clip_frac_high")[0] == family("value_clip_frac")[0] == "clip"
    assert family("completion/length_mean")[0] == "completion_length"
    assert family("kl")[0] == family("kl/sequence")[0] == "kl" and family("kl_coef")[0] == "kl_coef"
    assert family("eval/reward/total") == ("eval_reward", "eval: reward (mean: total and components)")
    assert (
        family("eval/exact_match")[0] == "eval_accuracy"
        and family("rewards/margins")[0] == "preference_rewards"
    )
    assert family("advantage/mean") == ("advantage", "advantage")  # unknown families: by first name


def test_an_sft_run_renders_its_curves_and_page(tmp_path):
    run = sft_run(tmp_path / "sft-a")
    written = write_plots(run)
    out = run / "report"
    names = [p.name for p in written]
    assert names[-1] == "report.html"
    expected = ["loss", "learning_rate", "grad_norm", "accuracy", "throughput", "eval_loss", "eval_accuracy"]
    assert names[:-1] == [f"{n}.png" for n in expected]
    for png in written[:-1]:
        assert png.parent == out
    assert_a_curve(out / "loss.png")  # one series: C0
    assert_a_curve(out / "eval_accuracy.png", (C0, C1))  # two series, one run: C0 and C1
    page = (out / "report.html").read_text()
    assert "sft-a" in page and "llama-tiny" in page and "0123456789abcdef" in page
    assert all(f"<img src='{n}.png'" in page for n in expected)
    assert "loss (1)" in page  # the NaN step is reported
    assert "&lt;b&gt;" not in page and "<b>" not in page  # text records are not metrics


def test_an_rl_run_gets_reward_kl_entropy_clip_and_length_panels(tmp_path):
    run = rl_run(tmp_path / "grpo")
    names = [p.stem for p in write_plots(run)][:-1]
    assert names == [
        "loss",
        "reward",
        "reward_groups",
        "reward_errors",
        "kl",
        "entropy",
        "clip",
        "completion_length",
        "learning_rate",
        "advantage",
        "eval_reward",
        "eval_accuracy",
    ]
    assert panels([load_run(run)])[1].keys == ("reward/total/mean", "reward/math_verify/mean")
    assert_a_curve(run / "report" / "reward.png", (C0, C1))
    for name in ("kl", "entropy", "completion_length"):
        assert_a_curve(run / "report" / f"{name}.png")
    page = (run / "report" / "report.html").read_text()
    assert "rl.group_size" in page and "grpo" in page


def test_several_runs_overlay_one_colour_each_and_the_page_compares_them(tmp_path):
    a = sft_run(tmp_path / "lr-small", lr=1e-3)
    b = sft_run(tmp_path / "lr-big", lr=3e-3, scale=0.5)
    written = write_report([a, b], tmp_path / "compare")
    assert_a_curve(tmp_path / "compare" / "loss.png", (C0, C1))
    page = written[-1].read_text()
    assert "lr-small" in page and "lr-big" in page
    assert "<h3>Differences (1)</h3>" in page and "optimizer.lr" in page
    assert not (a / "report").exists()  # a comparison writes only where it is told


def test_a_run_with_little_or_nothing_logged_never_raises(tmp_path, capsys):
    assert write_plots(tmp_path / "missing") == []
    (tmp_path / "empty").mkdir()
    assert write_plots(tmp_path / "empty") == []
    started = tmp_path / "started"
    started.mkdir()
    (started / "metrics.jsonl").write_text('{"step": 2, "split": "train", "loss": "nan"}\n{"step": 4, "spl')
    written = write_plots(started)
    assert [p.name for p in written] == ["report.html"]  # all-NaN loss: no panel; no summary.json yet
    page = written[0].read_text()
    assert "no summary.json" in page and "1 unreadable line" in page and "No metrics logged yet" in page
    one = tmp_path / "one"
    one.mkdir()
    (one / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 2.0, "mfu": "inf"}\n')
    assert [p.name for p in write_plots(one)] == ["loss.png", "report.html"]
    assert_a_curve(one / "report" / "loss.png", minimum=20)  # a single point: its marker
    assert capsys.readouterr().err == ""


def test_the_command_writes_into_the_run_and_names_its_mistakes(tmp_path, capsys):
    run = sft_run(tmp_path / "run")
    assert main([str(run)]) == 0
    assert (run / "report" / "report.html").is_file()
    assert "report.html" in capsys.readouterr().out

    (tmp_path / "not-a-run").mkdir()
    cases = {
        (str(tmp_path / "nowhere"),): "does not exist",
        (str(tmp_path / "not-a-run"),): "has no metrics.jsonl",
        (str(run), str(run)): "several runs need --out",
        (str(run), "--smoothing", "1.5"): "--smoothing must be in [0, 1)",
    }
    for args, message in cases.items():
        assert main(list(args)) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_the_module_runs_without_a_traceback(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "jaxrl_llm.report", str(tmp_path / "nowhere")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow  # trains (~8 s alone, ~20 s on a busy 2-core machine)
def test_a_real_training_run_renders(tmp_path):
    from jaxrl_llm.train import __main__ as train_main
    from tests.test_train_loop import TINY

    run_dir = tmp_path / "tiny-sft"
    overrides = ["--config.train.steps=12", "--config.train.eval_every=6", "--config.train.save_every=12"]
    overrides += ["--config.train.eval_at_start=true", "--config.train.export_hf=false"]
    assert train_main.main([*TINY, f"--config.run_dir={run_dir}", *overrides]) == 0

    written = write_plots(run_dir)
    names = {p.name for p in written}
    assert {"loss.png", "learning_rate.png", "eval_loss.png", "eval_accuracy.png", "report.html"} <= names
    assert_a_curve(run_dir / "report" / "loss.png")
    assert_a_curve(run_dir / "report" / "eval_accuracy.png", (C0, C1))  # token accuracy and exact match
    steps, loss = load_run(run_dir).series["loss"]
    assert list(steps) == [2, 4, 6, 8, 10, 12] and np.isfinite(loss).all()
    page = (run_dir / "report" / "report.html").read_text()
    assert "tiny-sft" in page and "sft" in page and "<img src='loss.png'" in page


@pytest.mark.parametrize("points", [16, 30, 200])
def test_auto_smoothing_is_light_on_short_curves(points):
    from jaxrl_llm.observe.report import auto_smoothing, ema

    weight = auto_smoothing(points)
    assert 0.3 < weight < 0.9 and (points < 100 or weight > 0.89)
    values = np.array([1.0, np.nan, 3.0])
    smoothed = ema(values, 0.5)
    assert smoothed[0] == 1.0 and np.isnan(smoothed[1]) and 1.0 < smoothed[2] < 3.0
