"""Histograms and W&B: MetricWriter.write_histogram (TensorBoard only, never metrics.jsonl), the RL
iteration's reward/advantage/completion-length histograms read back from the event files, and
observe.report_to=wandb (offline, no network): the run files under <run_dir>/wandb with the logged keys, one
run id kept across writers, and a clear error when wandb is missing."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jaxrl_llm.config.schema import FIELDS_BY_KEY
from jaxrl_llm.errors import UserError
from jaxrl_llm.observe import MetricWriter, Reporting
from jaxrl_llm.observe import reporting as reporting_mod
from tests.test_train_rl import ANSWER_MATCH, train

HAS_WANDB = importlib.util.find_spec("wandb") is not None
needs_wandb = pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install wandb)")


def histograms(run_dir: Path) -> dict[str, list]:
    """``{tag: [HistogramEvent(wall_time, step, histogram_value)]}`` from ``<run_dir>/tensorboard``."""
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"histograms": 0})
    acc.Reload()
    return {tag: acc.Histograms(tag) for tag in acc.Tags()["histograms"]}


def wandb_record(run_dir: Path) -> bytes:
    """The bytes of the offline W&B run's record file (one, named after the stored run id)."""
    run_id = (run_dir / reporting_mod.WANDB_ID_FILE).read_text().strip()
    files = sorted(run_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert files, sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    return b"".join(p.read_bytes() for p in files)


def test_a_histogram_goes_to_tensorboard_and_not_to_metrics_jsonl(tmp_path):
    with MetricWriter(tmp_path) as writer:
        writer.write(1, {"loss": 0.5})
        writer.write_histogram(1, "rl/reward", np.array([[0.0, 1.0], [1.0, np.nan]]))
        writer.write_histogram(2, "rl/reward", [3.0, 4.0, 5.0])
        writer.write_histogram(2, "empty", [np.nan])  # nothing left: nothing written
    hist = histograms(tmp_path)
    assert set(hist) == {"rl/reward"}
    first, second = (h.histogram_value for h in hist["rl/reward"])
    assert (first.num, first.sum, first.min, first.max) == (3, 2.0, 0.0, 1.0)  # the NaN left out
    assert (second.num, second.sum) == (3, 12.0)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["split"] for line in lines] == ["train"]


def test_report_to_names_the_loggers_and_refuses_unknown_ones():
    assert reporting_mod.parse_report_to("wandb") == ("tensorboard", "wandb")
    assert reporting_mod.parse_report_to("tensorboard, WANDB") == ("tensorboard", "wandb")
    assert reporting_mod.parse_report_to(["wandb"]) == ("tensorboard", "wandb")
    assert reporting_mod.parse_report_to("") == ("tensorboard",)
    with pytest.raises(UserError, match="unknown logger 'mlflow'.*'tensorboard', 'wandb'"):
        reporting_mod.parse_report_to("tensorboard,mlflow")
    assert FIELDS_BY_KEY["observe.wandb_mode"].choices == reporting_mod.WANDB_MODES
    assert FIELDS_BY_KEY["observe.report_to"].default == "tensorboard"


def test_report_to_wandb_without_wandb_installed_stops_before_the_model_loads(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    assert (
        train(
            tmp_path / "run", f"--config.reward.functions={ANSWER_MATCH}", "--config.observe.report_to=wandb"
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "observe.report_to includes 'wandb'" in err and "pip install wandb" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before the run started


class FakeWandb(types.ModuleType):
    """Records ``init`` arguments and logged dicts; enough of wandb for ``WandbRun``."""

    def __init__(self):
        super().__init__("wandb")
        self.inits: list[dict] = []
        self.logged: list[dict] = []
        self.finished = 0
        self.Histogram = lambda values: ("histogram", len(values))
        self.Html = lambda text: ("html", text)
        self.Table = lambda columns, data: ("table", columns, data)

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            def define_metric(self, *args, **kwargs):
                pass

            def log(self, values):
                fake.logged.append(values)

            def finish(self):
                fake.finished += 1

        return Run()


def test_the_wandb_run_keeps_its_id_across_writers_and_gets_what_the_writer_logs(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(reporting_mod, "require_wandb", lambda: None)
    report = Reporting(("tensorboard", "wandb"), wandb_project="proj", wandb_mode="offline")
    config = {"stage": "grpo", "rl.group_size": 4}
    with MetricWriter(tmp_path, report=report, config=config) as writer:
        writer.write(1, {"loss": 0.5})
        writer.write_histogram(1, "rl/advantage", [1.0, -1.0])
        writer.write_text(1, "note", "<b>")
        writer.write_samples(1, [{"prompt": "1+1", "completion": "2", "reward": 1.0}])
    with MetricWriter(tmp_path, report=report, config=config, resume_step=1):  # a resumed run
        pass
    first, second = fake.inits
    assert first["id"] == second["id"] == (tmp_path / "wandb_run_id").read_text().strip()
    assert first["resume"] == "allow" and first["mode"] == "offline" and first["project"] == "proj"
    assert first["dir"] == str(tmp_path) and first["config"] == {"stage": "grpo", "rl": {"group_size": 4}}
    assert fake.finished == 2
    assert fake.logged[0] == {"step": 1, "train/loss": 0.5}
    assert fake.logged[1] == {"step": 1, "rl/advantage": ("histogram", 2)}
    assert fake.logged[2] == {"step": 1, "note": ("html", "<pre>&lt;b&gt;</pre>")}
    assert fake.logged[3]["samples"][0] == "table"


def test_a_wandb_run_that_cannot_start_is_a_user_error(tmp_path, monkeypatch):
    fake = FakeWandb()

    def init(**kwargs):
        raise RuntimeError("api_key not configured (no-tty)")

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(reporting_mod, "require_wandb", lambda: None)
    report = Reporting(("tensorboard", "wandb"), wandb_mode="online")
    with pytest.raises(UserError, match="wandb.init failed .*api_key.*offline needs no account"):
        MetricWriter(tmp_path, report=report)
    assert not (tmp_path / "tensorboard").exists()


@needs_wandb
def test_report_to_wandb_offline_writes_the_run_under_run_dir(tmp_path):
    report = Reporting(("tensorboard", "wandb"))
    with MetricWriter(tmp_path, report=report, config={"seed": 0}) as writer:
        writer.write(3, {"loss": 0.25})
        writer.write_histogram(3, "rl/reward", [0.0, 1.0, 1.0])
    record = wandb_record(tmp_path)
    assert b"train/loss" in record and b"rl/reward" in record
    assert (tmp_path / "tensorboard").is_dir() and (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_grpo_run_logs_reward_advantage_and_length_histograms_and_an_offline_wandb_run(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        f"--config.reward.functions={ANSWER_MATCH}",
        "--config.train.steps=2",
        "--config.train.log_every=1",
        "--config.train.eval_every=100",
        "--config.train.export_hf=false",
    ]
    if HAS_WANDB:
        args.append("--config.observe.report_to=wandb")
    assert train(run_dir, *args) == 0
    hist = histograms(run_dir)
    tags = {"rl/reward", "rl/reward/answer_match", "rl/advantage", "rl/completion_length"}
    assert tags <= set(hist), sorted(hist)
    samples = 4 * 4  # rl.prompts_per_iteration x rl.group_size
    for tag in tags:
        assert [e.step for e in hist[tag]] == [1, 2]
        assert all(e.histogram_value.num == samples for e in hist[tag]), tag
    for event in hist["rl/advantage"]:  # group-mean baseline: each group's advantages sum to 0
        assert abs(event.histogram_value.sum) < 1e-3
    for event in hist["rl/reward"]:
        assert 0.0 <= event.histogram_value.min <= event.histogram_value.max <= 1.0
    for event in hist["rl/completion_length"]:
        assert 1 <= event.histogram_value.min <= event.histogram_value.max <= 6  # rollout.max_new_tokens
    assert not any(
        k.startswith("rl/")
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        for k in json.loads(line)
    )
    if HAS_WANDB:
        record = wandb_record(run_dir)
        for key in (b"train/loss", b"train/reward/total/mean", b"rl/advantage", b"rl/completion_length"):
            assert key in record, key
