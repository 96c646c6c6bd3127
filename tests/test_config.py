"""The config schema, validator and override parser: every kind of mistake names the key and the value."""

from __future__ import annotations

import json
import pathlib

import ml_collections
import pytest

from jaxrl_llm.config import (
    FIELDS,
    STAGE_NAMES,
    ConfigError,
    apply_overrides,
    base_config,
    describe,
    format_config,
    load_config,
    parse_args,
    validate,
)
from jaxrl_llm.parallel import MeshError, role_meshes
from jaxrl_llm.train.stages import STAGES

REPO = pathlib.Path(__file__).resolve().parents[1]


def _problems(cfg) -> str:
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    return str(info.value)


def _overridden(**overrides):
    """base_config() with dotted overrides given as ``optimizer__lr=...``."""
    return apply_overrides(base_config(), {k.replace("__", "."): v for k, v in overrides.items()})


# ------------------------------------------------------------------------------------------- schema


def test_every_key_has_a_doc_and_keys_are_unique():
    keys = [f.key for f in FIELDS]
    assert len(keys) == len(set(keys))
    for field in FIELDS:
        assert field.doc.strip(), f"{field.key} has no doc"


def test_base_config_validates_and_nests_by_dots():
    cfg = base_config()
    validate(cfg)
    assert cfg.optimizer.lr == 3e-4 and cfg.model.preset == "llama-tiny" and cfg.model.num_heads is None


def test_describe_lists_every_key_with_default_and_allowed():
    text = describe()
    for field in FIELDS:
        assert f"{field.key} = {field.default!r}" in text
    assert "float > 0" in text and "'llama-tiny'" in text


def test_stage_registry_covers_every_stage_name():
    assert tuple(STAGES) == STAGE_NAMES


@pytest.mark.parametrize("name", ["base", "quickstart"])
def test_config_files_load_and_validate(name):
    cfg = load_config(str(REPO / "configs" / f"{name}.py"))
    validate(cfg)


def test_quickstart_values():
    cfg = load_config(str(REPO / "configs" / "quickstart.py"))
    assert (cfg.stage, cfg.model.preset, cfg.run_dir) == ("sft", "llama-tiny", "runs/quickstart")
    assert cfg.train.steps <= 1000 and cfg.train.seq_len <= 128 and cfg.data.eval_split > 0


# ------------------------------------------------------------------------------- single-key mistakes


def test_unknown_key_suggests_the_closest():
    cfg = base_config()
    cfg.optimizer.lrr = 0.1
    assert "optimizer.lrr=0.1: unknown key; did you mean optimizer.lr?" in _problems(cfg)


def test_unknown_section_is_reported_once():
    cfg = base_config()
    cfg.optimiser = {"lr": 1.0}
    text = _problems(cfg)
    assert "optimiser=" in text and "did you mean optimizer" in text and "optimiser.lr" not in text


def test_missing_key_is_named():
    cfg = base_config()
    del cfg.train["steps"]
    assert "train.steps: missing key" in _problems(cfg)


def test_section_given_as_a_value():
    cfg = base_config()
    cfg.optimizer = 3
    text = _problems(cfg)
    assert "optimizer=3: must be a section" in text and "missing" not in text


def test_bool_is_not_an_int():
    cfg = base_config()
    cfg.train.steps = True
    assert "train.steps=True: expected int >= 1, got bool" in _problems(cfg)


def test_int_is_accepted_as_float_and_none_only_where_nullable():
    cfg = base_config()
    cfg.optimizer.lr = 1
    cfg.optimizer.clip_norm = None
    validate(cfg)
    cfg.train.batch_size = None
    assert "train.batch_size=None: expected int >= 1, got None" in _problems(cfg)


def test_string_where_number_expected():
    cfg = base_config()
    cfg.optimizer.lr = "abc"
    assert "optimizer.lr='abc': expected float > 0, got str" in _problems(cfg)


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("optimizer.lr", -1.0, "float > 0"),
        ("optimizer.lr", float("nan"), "a finite float > 0"),
        ("optimizer.lr", float("inf"), "a finite float > 0"),  # would train to NaN and export it
        ("train.seq_len", 1, "int >= 2"),  # no next-token target in a 1-token row
        ("optimizer.b2", 1.0, "float in [0, 1)"),
        ("train.steps", 0, "int >= 1"),
        ("parallel.tensor", 0, "int >= 1 or -1"),
        ("parallel.fsdp", -2, "int >= 1 or -1"),
        ("model.num_layers", 0, "None or int >= 1"),
    ],
)
def test_out_of_range(key, value, allowed):
    cfg = apply_overrides(base_config(), [(key, value)])
    assert f"{key}={value!r}: must be {allowed}" in _problems(cfg)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_no_float_key_takes_a_non_finite_number(value):
    floats = [f for f in FIELDS if f.type is float]
    cfg = apply_overrides(base_config(), [(f.key, value) for f in floats])
    problems = _problems(cfg)
    for f in floats:
        assert f"{f.key}={value!r}: must be a finite " in problems


def test_bad_choice_lists_the_allowed_values():
    text = _problems(_overridden(stage="foo"))
    assert (
        "stage='foo': must be one of 'sft', 'pt', 'rm', 'dpo', 'kto', 'orpo', 'simpo', 'ppo', 'grpo'" in text
    )


def test_bad_preset_suggests_the_closest():
    text = _problems(_overridden(model__preset="llama-tinny"))
    assert "model.preset='llama-tinny'" in text and "did you mean 'llama-tiny'?" in text


# ------------------------------------------------------------------------------------ combinations


def test_at_most_one_parallel_axis_fills():
    text = _problems(_overridden(parallel__data=-1, parallel__tensor=-1))
    assert "parallel.data=-1, parallel.tensor=-1: at most one parallel axis may be -1" in text
    validate(_overridden(parallel__data=2, parallel__fsdp=-1))


def test_model_size_keys_are_the_architectures_sizes():
    from jaxrl_llm.config.schema import MODEL_SIZES
    from jaxrl_llm.models.config import SIZE_FIELDS

    assert MODEL_SIZES == SIZE_FIELDS


def test_freeze_pattern_must_be_a_regex():
    assert "optimizer.freeze='blocks/(': not a valid regular expression" in _problems(
        _overridden(optimizer__freeze="blocks/(")
    )
    validate(_overridden(optimizer__freeze="embed|attn_norm"))


def test_run_dir_must_not_be_a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("")
    assert f"run_dir={str(path)!r}: exists and is not a directory" in _problems(
        _overridden(run_dir=str(path))
    )


def test_multi_process_settings():
    text = _problems(_overridden(parallel__num_processes=2, parallel__process_id=2))
    assert "parallel.process_id=2, parallel.num_processes=2: parallel.process_id must be below" in text
    assert "needs the coordinator's host:port" in text
    validate(
        _overridden(parallel__num_processes=2, parallel__process_id=1, parallel__coordinator_address="h:1")
    )


def test_rl_role_meshes():
    assert "rl.reference_mesh='data': expected comma-separated axis=size" in _problems(
        _overridden(stage="grpo", rl__beta=0.1, rl__reference_mesh="data")
    )
    assert "a grpo run without a KL penalty has no reference model to place" in _problems(
        _overridden(stage="grpo", rl__reference_mesh="data=2")
    )
    assert "a ppo run without a KL term has no reference model" in _problems(
        _overridden(stage="ppo", rl__kl_coef=0.0, rl__reference_mesh="data=2")
    )
    assert "set rollout.mesh" in _problems(_overridden(stage="grpo", rollout__off_policy=True))
    roles = {"rollout__mesh": "data=2", "rl__reference_mesh": "fsdp=2", "reward__mesh": "data=1"}
    multi = {"parallel__num_processes": 2, "parallel__process_id": 1, "parallel__coordinator_address": "h:1"}
    rewards = [{"name": "math_verify"}]
    validate(_overridden(stage="grpo", rl__beta=0.04, reward__functions=rewards, **multi, **roles))
    with pytest.raises(MeshError, match="rollout.mesh: a mesh of 1 devices leaves none of the 1"):
        role_meshes(base_config().parallel, {"rollout.mesh": (1, 1, 1)})


def _checkpoint(tmp_path, **hf) -> str:
    from jaxrl_llm.models import get_preset, to_hf_config

    (tmp_path / "config.json").write_text(json.dumps({**to_hf_config(get_preset("llama-tiny")), **hf}))
    return str(tmp_path)


def test_model_path_with_an_unsupported_architecture(tmp_path):
    text = _problems(_overridden(model__path=_checkpoint(tmp_path, model_type="gpt2")))
    assert "model.path=" in text and "model_type='gpt2'" in text and "is not supported" in text


def test_model_path_with_size_override(tmp_path):
    cfg = _overridden(model__path=_checkpoint(tmp_path), model__hidden_size=128)
    assert "model.path=" in (text := _problems(cfg)) and "model.hidden_size=128: the sizes come from" in text
    validate(_overridden(model__path=str(tmp_path), tokenizer__path=str(tmp_path)))


def test_model_path_must_exist(tmp_path):
    missing = str(tmp_path / "no-such-ckpt")
    assert f"model.path={missing!r}: not a directory" in _problems(_overridden(model__path=missing))
    hub_id = _problems(_overridden(model__path="meta-llama/Llama-3.1-8B"))
    assert "model.path='meta-llama/Llama-3.1-8B': not a directory" in hub_id and "not downloaded" in hub_id
    assert "no config.json" in _problems(_overridden(model__path=str(tmp_path)))


def test_tokenizer_path_must_exist(tmp_path):
    missing = str(tmp_path / "tok.model")
    assert f"tokenizer.path={missing!r}: no such file" in _problems(_overridden(tokenizer__path=missing))


def test_heads_must_be_a_multiple_of_kv_heads_using_preset_values():
    text = _problems(_overridden(model__num_kv_heads=3))
    assert (
        "model.num_heads=4 (preset 'llama-tiny'), model.num_kv_heads=3: model.num_heads must be a multiple"
        in text
    )
    validate(_overridden(model__num_heads=6, model__num_kv_heads=3))


def test_batch_size_divisible_by_grad_accum():
    text = _problems(_overridden(train__batch_size=8, train__grad_accum_steps=3))
    assert "train.batch_size=8, train.grad_accum_steps=3: train.batch_size must be divisible" in text


def test_seq_len_within_max_seq_len(tmp_path):
    text = _problems(_overridden(train__seq_len=1024))
    assert "train.seq_len=1024, model.max_seq_len=512 (preset 'llama-tiny')" in text
    assert "model.max_seq_len=64" in _problems(_overridden(train__seq_len=65, model__max_seq_len=64))
    ckpt = _checkpoint(tmp_path, max_position_embeddings=128)
    assert "max_position_embeddings=128" in _problems(_overridden(model__path=ckpt, train__seq_len=256))


def test_warmup_not_longer_than_training():
    text = _problems(_overridden(optimizer__warmup_steps=20, train__steps=10))
    assert (
        "optimizer.warmup_steps=20, train.steps=10: optimizer.warmup_steps (optimizer updates) must not"
        in text
    )
    # An RL iteration makes rl.num_iterations x rl.minibatches updates: the warmup is counted in updates.
    rl = dict(stage="grpo", reward__functions=[{"name": "math_verify"}], train__steps=10, rl__minibatches=2)
    validate(_overridden(optimizer__warmup_steps=20, **rl))  # 20 updates: no problem
    assert "train.steps=10 x 2 updates an iteration" in _problems(
        _overridden(optimizer__warmup_steps=21, **rl)
    )


def test_a_bad_key_skips_the_combinations_it_is_in():
    # batch_size is already wrong; "not divisible" about it would only repeat that.
    text = _problems(_overridden(train__batch_size=0, train__grad_accum_steps=3))
    assert "train.batch_size=0: must be int >= 1" in text and "divisible" not in text


def test_several_problems_in_one_error():
    cfg = _overridden(optimizer__lr=-1.0, stage="foo", train__grad_accum_steps=3)
    cfg.optimizer.lrr = 1.0
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert len(info.value.problems) == 4
    assert str(info.value).count("\n") == 3
    for key in ("optimizer.lrr", "optimizer.lr=-1.0", "stage='foo'", "train.grad_accum_steps=3"):
        assert key in str(info.value)


# --------------------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    "raw, expected", [("true", True), ("YES", True), ("1", True), ("False", False), ("no", False)]
)
def test_bool_override_spellings(raw, expected):
    assert _overridden(model__scan_layers=raw).model.scan_layers is expected


def test_override_coercion():
    cfg = _overridden(
        optimizer__lr="1e-4", train__steps="2e3", optimizer__clip_norm="none", model__remat="none"
    )
    assert cfg.optimizer.lr == 1e-4 and isinstance(cfg.optimizer.lr, float)
    assert cfg.train.steps == 2000 and isinstance(cfg.train.steps, int)
    assert cfg.optimizer.clip_norm is None
    assert cfg.model.remat == "none"  # a plain string where the key is not nullable


@pytest.mark.parametrize(
    "key, raw, expected",
    [
        ("optimizer.lr", "abc", "optimizer.lr='abc': expected float > 0; 'abc' is not a number"),
        ("train.steps", "1.5", "train.steps='1.5': expected int >= 1; '1.5' is not an integer"),
        ("train.steps", "none", "train.steps='none': expected int >= 1"),
        ("model.scan_layers", "maybe", "model.scan_layers='maybe': expected bool"),
        ("optimizer.lrr", "1", "optimizer.lrr='1': unknown key; did you mean optimizer.lr?"),
        ("lr", "1", "lr='1': unknown key; did you mean optimizer.lr?"),
        ("optimizer", "1", "optimizer='1': is a section, not a key"),
    ],
)
def test_bad_override_names_key_and_value(key, raw, expected):
    with pytest.raises(ConfigError) as info:
        apply_overrides(base_config(), [(key, raw)])
    assert expected in str(info.value)


def test_apply_overrides_returns_a_copy_and_applies_in_order():
    cfg = base_config()
    out = apply_overrides(cfg, [("train.steps", "5"), ("train.steps", "7")])
    assert out.train.steps == 7 and cfg.train.steps == 1000


def test_overrides_work_on_a_type_safe_config():
    # A config file may build its own type-safe ConfigDict; an int field must still take a float override.
    cfg = ml_collections.ConfigDict(base_config().to_dict())
    cfg.optimizer.clip_norm = 1
    assert apply_overrides(cfg, [("optimizer.clip_norm", "0.5")]).optimizer.clip_norm == 0.5


# ------------------------------------------------------------------------------------- config files


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "my_config.py"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("def get_config(:\n", "syntax error on line 1"),
        ("x = 1\n", "defines no get_config()"),
        ("def get_config():\n    return 3\n", "get_config() returned int"),
        (
            "import os\n\ndef get_config():\n    return {}['nope']\n",
            "get_config() raised KeyError: 'nope' (line 4)",
        ),
        ("raise RuntimeError('boom')\n", "raised RuntimeError: boom (line 1)"),
    ],
)
def test_bad_config_file_names_the_path(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"config file {path!r}" in str(info.value) and expected in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "nope.py"))


# ------------------------------------------------------------------------------------- parse_args


def test_parse_args_both_spellings_and_order():
    quick = str(REPO / "configs" / "quickstart.py")
    cfg = parse_args(["--config", quick, "--config.train.steps", "90", "--config.optimizer.lr=1e-4"])
    assert cfg.train.steps == 90 and cfg.optimizer.lr == 1e-4 and cfg.run_dir == "runs/quickstart"
    cfg = parse_args([f"--config={quick}", "--config.parallel.data", "-1"])
    assert cfg.parallel.data == -1


def test_parse_args_without_config_uses_base():
    assert parse_args(["--config.seed=3"]).seed == 3


def test_parse_args_collects_argument_and_override_problems():
    with pytest.raises(ConfigError) as info:
        parse_args(
            [
                "bogus",
                "--config.optimizer.lr=abc",
                "--config.train.steps",
                "--config",
                "a.py",
                "--config=b.py",
            ]
        )
    text = str(info.value)
    assert "'bogus': unknown argument" in text
    assert "optimizer.lr='abc'" in text
    assert "--config.train.steps: missing value" in text
    assert "config file given twice" in text


def test_parse_args_validates():
    with pytest.raises(ConfigError, match="optimizer.warmup_steps=5000, train.steps=1000"):
        parse_args(["--config.optimizer.warmup_steps=5000"])


def test_format_config_lists_every_key():
    text = format_config(_overridden(optimizer__lr=0.5))
    assert "optimizer.lr" in text and "0.5" in text and len(text.splitlines()) == len(FIELDS)


def test_docs_config_reference_is_current():
    from pathlib import Path

    from jaxrl_llm.config import describe

    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    assert describe() in doc, "docs/config.md is stale: regenerate it from `python -m jaxrl_llm.config`"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.eval_generate": 8}, "there is no evaluation set to generate from"),
        (
            {"train.eval_generate": 8, "data.eval_split": 0.1, "stage": "pt"},
            "raw text has no answers to compare with",
        ),
        (
            {
                "data.packing": "bucket",
                "data.process_split": "records",
                "parallel.num_processes": 2,
                "parallel.coordinator_address": "h:1",
            },
            "data.packing='bucket', parallel.num_processes=2: processes reading their own records",
        ),
        (
            {
                "stage": "dpo",
                "data.process_split": "records",
                "parallel.num_processes": 2,
                "parallel.coordinator_address": "h:1",
            },
            "stage='dpo', parallel.num_processes=2: processes reading their own records",
        ),
        ({"data.eval_path": "e.jsonl", "data.eval_split": 0.1}, "not both"),
    ],
)
def test_training_combinations(overrides, message):
    assert message in _problems(apply_overrides(base_config(), overrides))


def test_dpo_loss_types_mirror_the_objectives():
    from jaxrl_llm.config.schema import DPO_LOSS_TYPES
    from jaxrl_llm.objectives import DPO_LOSS_TYPES as IMPLEMENTED

    assert DPO_LOSS_TYPES == IMPLEMENTED
