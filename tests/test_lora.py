"""LoRA (``jaxrl_llm.models.lora``): the adapted model starts as the base, a step trains only the adapters
(gradients and optimizer state), the reference is the base with the adapters off (no copy), the output
projection's adapter reads its input as the others do (dropout included), the merged export and the PEFT
adapter give our logits in HF transformers and ``peft``, checkpoints hold the adapters alone and restore
them exactly, and through the real command: SFT with LoRA learns a new task (held-out loss down, token
accuracy up), exports both ways, refuses another base on resume. GRPO with LoRA (its reference a view of the
policy's weights, every role on a mesh of its own) is tested in test_train_rl.py."""

from __future__ import annotations

import functools
import json
import shutil
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.config import base_config, schema, validate
from jaxrl_llm.config.validate import ConfigError
from jaxrl_llm.models import create_model, get_preset, load_hf, save_hf
from jaxrl_llm.models import lora as L
from jaxrl_llm.models.lora_io import ADAPTER_CONFIG, base_fingerprint, fingerprint_differences, save_peft
from jaxrl_llm.objectives import sft_objective
from jaxrl_llm.train.state import TrainState
from tests.hf_reference import hf_logits, make_hf_model, padded_batch, transformers

ROOT = Path(__file__).resolve().parents[1]
SFT_MODEL = ROOT / "tests" / "data" / "models" / "arith-sft"
TINY = get_preset("llama-tiny", vocab_size=97)
TOL = 1e-4


def with_random_adapters(model, seed: int = 1, scale: float = 0.05):
    """``model`` with every adapter's B random (A is random already), so that the adapters matter."""
    for i, (_, adapter) in enumerate(L.adapters(model)):
        key = jax.random.fold_in(jax.random.key(seed), i)
        adapter.lora_b[...] = scale * jax.random.normal(key, adapter.lora_b.shape)
    return model


def logits(model, tokens, mask=None) -> np.ndarray:
    """float32[B, T, V]: ``model``'s forward, compiled (once per graph definition and shape)."""
    graphdef, state = nnx.split(model)
    return np.asarray(
        _forward(graphdef, state, jnp.asarray(tokens), None if mask is None else jnp.asarray(mask))
    )


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, mask):
    return nnx.merge(graphdef, state)(tokens, attention_mask=mask)


_TINY_MODEL = []


def tiny(rank: int = 0, **lora):
    """A fresh copy of one tiny Llama (made once: module surgery never touches the original), with
    adapters of ``rank`` when given."""
    if not _TINY_MODEL:
        _TINY_MODEL.append(create_model(TINY))
    model = nnx.clone(_TINY_MODEL[0])
    return L.apply_lora(model, L.LoRAConfig(rank=rank, **lora)) if rank else model


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A tiny random Llama in HF transformers and its checkpoint directory."""
    return make_hf_model("llama", tmp_path_factory.mktemp("hf") / "llama")


def test_adapted_model_starts_as_the_base_under_scan_and_remat(hf_llama):
    _, path = hf_llama
    tokens, mask = padded_batch()
    want = logits(load_hf(path), tokens, mask)
    model = L.apply_lora(load_hf(path), L.LoRAConfig(rank=4, dropout=0.1))
    assert [p for p, _ in L.adapters(model)] == [f"blocks/{m}" for m in schema.LORA_MODULES]
    np.testing.assert_array_equal(logits(model, tokens, mask), want)  # B = 0: exactly the base
    adapted = logits(with_random_adapters(model), tokens, mask)
    assert np.abs(adapted - want).max() > 0.1
    # The stacked adapters scan over layers and rematerialise like the weights they adapt.
    other = L.apply_lora(load_hf(path, scan_layers=True, remat="full"), L.LoRAConfig(rank=4, dropout=0.1))
    nnx.update(other, nnx.state(model))
    assert np.abs(logits(other, tokens, mask) - adapted).max() <= TOL


def test_targets_select_projections_and_mistakes_are_named():
    model = tiny(2, targets="attn/(q|v)$")
    assert [p for p, _ in L.adapters(model)] == ["blocks/attn/q", "blocks/attn/v"]
    assert L.adapters(model)[0][1].lora_a.shape == (TINY.num_layers, TINY.hidden_size, 2)
    assert L.adapters(model)[0][1].lora_a.get_metadata()["axes"] == ("embed", None)  # sharded like W's input
    with pytest.raises(L.LoRAError, match="blocks/mlp/down"):
        tiny(2, targets="lm_head")
    assert schema.LORA_TARGETS == L.DEFAULT_TARGETS
    assert {tuple(m.split("/")) for m in schema.LORA_MODULES} == set(L.PROJECTIONS)
    cfg = base_config()
    cfg.lora.rank, cfg.lora.targets = -1, "nothing"
    with pytest.raises(ConfigError, match="lora.rank=-1: must be int >= 0"):
        validate(cfg)
    cfg.lora.rank = 8
    with pytest.raises(ConfigError, match="matches none of the projections; they are blocks/attn/q"):
        validate(cfg)


def _batch(batch: int = 4, length: int = 16) -> dict[str, np.ndarray]:
    tokens = np.random.RandomState(0).randint(1, TINY.vocab_size, (batch, length)).astype(np.int32)
    return {
        "tokens": tokens,
        "loss_mask": np.ones((batch, length), bool),
        "segment_ids": np.ones((batch, length), np.int32),
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
    }


def test_a_step_trains_the_adapters_alone():
    from jaxrl_llm.train.optimizer import OptimizerConfig, make_optimizer
    from jaxrl_llm.train.step import build_update

    model = tiny(4, dropout=0.1)
    tx = make_optimizer(OptimizerConfig(lr=1e-2, warmup_steps=0), nnx.state(model, L.TRAINABLE))
    graphdef, state = TrainState.create(model, tx, jax.random.key(0), trainable=L.TRAINABLE)
    adapter_sizes = sorted(x.size for x in jax.tree.leaves(nnx.state(model, L.LoRAParam)))
    moments = sorted(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)  # AdamW's mu and nu
    assert moments == sorted(adapter_sizes * 2)  # no optimizer state for the base
    before = dict(nnx.to_flat_state(jax.tree.map(np.asarray, state.params)))
    new, metrics = jax.jit(build_update(graphdef, sft_objective(), tx))(state, _batch(), jax.random.key(1))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["skipped"]) == 0
    after = dict(nnx.to_flat_state(new.params))
    for path, var in before.items():
        changed = not np.array_equal(np.asarray(after[path].get_value()), var.get_value())
        # The base never moves; B does (A's first gradient is zero, as B is).
        assert changed == (path[-1] == "lora_b"), path


def test_the_reference_is_the_base_with_the_adapters_off_and_holds_no_weights():
    from jaxrl_llm.train.stages import frozen_models

    tokens, _ = padded_batch()
    want = logits(tiny(), tokens)
    model = with_random_adapters(tiny(4))
    frozen = frozen_models(("reference",), model, model)
    assert jax.tree.leaves(frozen) == [] and frozen.views == (("reference", ()),)
    with pytest.raises(ValueError, match="bind"):
        frozen.models()
    reference = frozen.bind(model).models()["reference"]  # (or the training state's params)
    np.testing.assert_array_equal(logits(reference, tokens), want)
    assert np.abs(logits(model, tokens) - want).max() > 0.1  # the policy itself has its adapters
    pair = nnx.Dict(policy=model)  # as PPO's actor-critic holds it: the view reads the policy's place
    assert frozen_models(("reference",), model, pair).views == (("reference", ("policy",)),)


def test_the_output_projection_takes_its_adapter_on_its_input_with_dropout():
    tokens, _ = padded_batch()
    model = with_random_adapters(tiny(4, dropout=0.5, targets="attn/o$"))
    eval_logits = logits(model, tokens)  # the same function as the merged weight W_o + A B alpha / r
    assert np.abs(eval_logits - logits(L.merged(model), tokens)).max() <= TOL
    graphdef, state = nnx.split(model)

    @jax.jit
    def training(key):
        adapted = nnx.merge(graphdef, state)
        L.use_dropout(adapted, key)
        return adapted(jnp.asarray(tokens))

    first, second = np.asarray(training(jax.random.key(1))), np.asarray(training(jax.random.key(2)))
    # Dropout on the heads that o reads: each training forward draws its own mask.
    assert np.abs(first - second).max() > 0.01 and np.abs(first - eval_logits).max() > 0.01


def test_merged_export_and_peft_adapter_give_our_logits_in_hf(hf_llama, tmp_path):
    peft = pytest.importorskip("peft")
    hf_base, path = hf_llama
    model = with_random_adapters(L.apply_lora(load_hf(path), L.LoRAConfig(rank=4, alpha=16)))
    tokens, mask = padded_batch()
    ours, valid = logits(model, tokens, mask), mask.astype(bool)
    save_hf(L.merged(model), tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", attn_implementation="eager"
    )
    assert np.abs(hf_logits(merged.eval(), tokens, mask) - ours)[valid].max() <= TOL
    save_peft(model, tmp_path / "adapter", base_model=str(path))
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 16.0)
    assert config["base_model_name_or_path"] == str(path) and "o_proj" in config["target_modules"]
    adapted = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    assert np.abs(hf_logits(adapted, tokens, mask) - ours)[valid].max() <= TOL
    adapted.unload()  # the shared HF model back to the base


def test_checkpoints_hold_the_adapters_alone_and_restore_them_exactly(tmp_path):
    from jaxrl_llm.checkpoint import Checkpointer
    from jaxrl_llm.train import loop
    from jaxrl_llm.train.optimizer import OptimizerConfig, make_optimizer

    def state_of(model):
        tx = make_optimizer(OptimizerConfig(warmup_steps=0), nnx.state(model, L.TRAINABLE))
        return TrainState.create(model, tx, jax.random.key(0), trainable=L.TRAINABLE)[1]

    trained = state_of(with_random_adapters(tiny(4)))
    checkpointer = Checkpointer(tmp_path, keep=1)
    checkpointer.save(3, trained.checkpointed(), None, {"loop_step": 3}, force=True)
    checkpointer.wait()
    params = [k for k in _saved_arrays(checkpointer, 3) if k.startswith("params.")]
    assert params and all(".lora_" in k for k in params), params  # no base weight is saved
    fresh = state_of(tiny(4))
    config = loop.LoopConfig(run_dir=str(tmp_path), stage="sft", steps=5)
    restored, meta, step = loop._restore(config, checkpointer, fresh, types.SimpleNamespace(data=None), {})
    checkpointer.close()
    assert step == 3 and meta["loop_step"] == 3
    for (path, want), (_, got) in zip(
        nnx.to_flat_state(trained.params), nnx.to_flat_state(restored.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got.get_value()), np.asarray(want.get_value()), str(path))
    # The base comes back from model.path on resume: its recorded fingerprint tells another base apart.
    other = tiny(4)
    other.blocks.mlp.up[...] = other.blocks.mlp.up[...] * 1.001
    record = base_fingerprint(tiny(4))
    assert fingerprint_differences(record, base_fingerprint(tiny(4))) == []
    assert fingerprint_differences(record, base_fingerprint(other)) == ["blocks/mlp/up"]


def _saved_arrays(checkpointer, step: int) -> list[str]:
    import orbax.checkpoint as ocp

    from jaxrl_llm.checkpoint.manager import _shapes

    with ocp.StandardCheckpointer() as reader:
        tree = reader.metadata(checkpointer.directory / str(step) / "state").item_metadata.tree
    return list(_shapes(tree))


# --- through the real command (python -m jaxrl_llm.train) -------------------------------------------------

SFT = [
    "--config",
    str(ROOT / "configs" / "base.py"),
    f"--config.model.path={SFT_MODEL}",
    "--config.render.template=chatml",
    # arith-sft adds; with LoRA it learns to subtract.
    "--config.data.path=synthetic:arithmetic?n=400&digits=2&ops=-&seed=1",
    "--config.data.eval_split=0.1",
    "--config.train.steps=10",
    "--config.train.batch_size=8",
    "--config.train.seq_len=64",
    "--config.train.log_every=5",
    "--config.train.eval_every=10",
    "--config.train.save_every=5",
    "--config.train.eval_at_start=true",
    "--config.optimizer.lr=1e-2",
    "--config.optimizer.warmup_steps=0",
    "--config.lora.rank=8",
    "--config.lora.dropout=0.05",
]


def _train(*args: str) -> int:
    from jaxrl_llm.train import __main__ as train_main

    return train_main.main(list(args))


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("lora") / "sft"
    assert _train(*SFT, f"--config.run_dir={run_dir}") == 0
    return run_dir


@pytest.mark.slow
def test_lora_sft_learns_a_new_task(sft_run):
    summary = json.loads((sft_run / "summary.json").read_text())
    first, final = summary["first_eval"]["loss"], summary["final_eval"]["loss"]
    print("held-out loss", first, "->", final)
    assert final < 0.9 * first
    accuracy = summary["first_eval"]["token_accuracy"], summary["final_eval"]["token_accuracy"]
    print("held-out token accuracy", *accuracy)
    assert accuracy[1] > accuracy[0] + 0.02  # measured 0.436 -> 0.483 (172 answer tokens)
    assert (sft_run / "final" / "config.json").is_file()  # merged: a plain HF checkpoint
    assert json.loads((sft_run / "adapter" / ADAPTER_CONFIG).read_text())["r"] == 8
    assert json.loads((sft_run / "lora_base.json").read_text())["model.path"] == str(SFT_MODEL)


@pytest.mark.slow
def test_lora_run_exports_any_checkpoint_both_ways(sft_run, tmp_path, capsys):
    from jaxrl_llm.export import __main__ as export_main

    assert export_main.main([str(sft_run), "--out", str(tmp_path / "merged")]) == 0
    assert "the same parameters as the run's final export" in capsys.readouterr().out
    final, again = load_hf(sft_run / "final"), load_hf(tmp_path / "merged")
    tokens = np.arange(1, 13, dtype=np.int32)[None]
    np.testing.assert_array_equal(logits(again, tokens), logits(final, tokens))
    assert export_main.main([str(sft_run), "--step", "5", "--adapter", "--out", str(tmp_path / "a5")]) == 0
    assert "PEFT LoRA adapter" in capsys.readouterr().out
    assert (tmp_path / "a5" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_lora_resume_on_another_base_is_refused(sft_run, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    other = tmp_path / "other-base"
    shutil.copytree(SFT_MODEL, other)
    weights = load_file(str(other / "model.safetensors"))
    weights["model.layers.0.mlp.up_proj.weight"] *= 1.01
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    run_dir = tmp_path / "run"
    shutil.copytree(sft_run, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "10")
    code = _train(*SFT, f"--config.run_dir={run_dir}", f"--config.model.path={other}")
    assert code == 2
    err = capsys.readouterr().err
    assert "LoRA checkpoints trained on another base model" in err and "blocks/mlp/up" in err
