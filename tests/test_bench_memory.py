"""The memory planner (``python -m jaxrl_llm.bench memory``): per-device figures from shapes and the sharding
rules, a compiled figure on simulated devices, LoRA, and its errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import pytest

from jaxrl_llm.bench.__main__ import main
from jaxrl_llm.bench.memory import RL_STAGES, STAGES, MemorySpec, abstract_figures
from jaxrl_llm.bench.memory_cli import batch_step, largest_fit
from jaxrl_llm.bench.memory_compile import compiled_figures
from jaxrl_llm.models import get_preset
from tests.simulated_devices import run_on_cpu_devices

ROOT = Path(__file__).resolve().parents[1]


def test_parameters_and_optimizer_state_shrink_as_fsdp_grows():
    figures = [abstract_figures(MemorySpec("llama-tiny", (1, f, 1))) for f in (1, 2, 4)]
    for name in ("parameters", "gradients", "optimizer_state"):
        one, two, four = (f[name] for f in figures)
        assert one > two > four, name
        # Every matrix splits over fsdp; only the norm vectors (and Adam's step counts) are replicated.
        assert two < 0.52 * one and four < 0.27 * one, name
    assert figures[0]["parameters"] == 4 * get_preset("llama-tiny").num_params()  # float32, one device


def test_figures_equal_really_created_sharded_arrays():
    run_on_cpu_devices([str(ROOT / "tests" / "memory_4dev.py")], 4, "memory planner checks passed")


def test_lora_adapters_by_hand_and_what_they_save():
    e, kv, m, r = 4096, 8 * 128, 14336, 16
    per_layer = (e + e) + 2 * (e + kv) + (e + e) + 3 * (e + m)  # q, k, v, o, gate, up, down: in + out
    full = abstract_figures(MemorySpec("llama3.1-8b", (1, 8, 1), stage="dpo"))
    lora = abstract_figures(MemorySpec("llama3.1-8b", (1, 8, 1), stage="dpo", lora_rank=r))
    assert lora["trained_param_count"] == lora["param_count"] - full["param_count"] == 32 * r * per_layer
    # 0.5% of the parameters; more of a device's share, since B's output axes have no fsdp rule.
    assert lora["optimizer_state"] < 0.05 * full["optimizer_state"]
    assert lora["gradients"] < 0.05 * full["gradients"]
    assert full["parameters"] < lora["parameters"] < 1.05 * full["parameters"]  # the base stays, frozen
    assert full["reference"] == full["parameters"] and lora["reference"] == 0  # the base is the reference


def check_lora_figures_against_real_adapters() -> None:
    """Run on 2 simulated devices (``test_lora_figures_equal_real_adapters``): on each mesh the planner's
    LoRA figures equal the bytes a device holds of a bfloat16 base placed by the rules with float32
    adapters born sharded by ``apply_lora``, and of its training state made and placed as ``run_stage``
    makes and places it."""
    from flax import nnx

    from jaxrl_llm.models import create_model
    from jaxrl_llm.models.lora import TRAINABLE, LoRAConfig, LoRAParam, apply_lora
    from jaxrl_llm.parallel import make_mesh, place
    from jaxrl_llm.train.optimizer import OptimizerConfig, make_optimizer
    from jaxrl_llm.train.state import TrainState

    def on_first_device(tree) -> int:
        first = jax.devices()[0]
        shards = (s for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == first)
        return sum(s.data.nbytes for s in shards)

    seen = []
    base_model = create_model(MemorySpec("llama-tiny", param_dtype="bfloat16").model_config())
    for sizes in ((1, 1, 1), (1, 2, 1), (1, 1, 2)):
        spec = MemorySpec("llama-tiny", sizes, lora_rank=4, param_dtype="bfloat16")
        mesh = make_mesh(*sizes, devices=jax.devices()[: spec.devices])
        model = nnx.clone(base_model)
        nnx.update(model, place(nnx.state(model), mesh))
        model = apply_lora(model, LoRAConfig(rank=4), mesh=mesh)
        tx = make_optimizer(OptimizerConfig(), nnx.state(model, TRAINABLE))
        _, state = TrainState.create(model, tx, jax.random.key(0), trainable=TRAINABLE)
        planned = abstract_figures(spec)
        base = abstract_figures(MemorySpec("llama-tiny", sizes, param_dtype="bfloat16"))["parameters"]
        adapters = on_first_device(nnx.state(model, LoRAParam))
        assert planned["parameters"] - base == adapters, (sizes, planned, adapters)
        assert planned["parameters"] == on_first_device(nnx.state(model, nnx.Param)), sizes
        assert planned["gradients"] == adapters, sizes  # float32, the adapters' alone
        assert planned["optimizer_state"] == on_first_device(place(state, mesh).opt_state), sizes
        seen.append(adapters)
    assert seen[0] > seen[1] and seen[0] > seen[2]  # A splits over fsdp (embed inputs), B over tensor
    print("LoRA planner checks passed")


def test_lora_figures_equal_real_adapters():
    code = "from tests.test_bench_memory import check_lora_figures_against_real_adapters as check; check()"
    run_on_cpu_devices(["-c", code], 2, "LoRA planner checks passed")


def test_bfloat16_parameters_halve_parameters_and_moments_not_gradients():
    f32 = abstract_figures(MemorySpec("llama-tiny"))
    bf16 = abstract_figures(MemorySpec("llama-tiny", param_dtype="bfloat16"))
    assert bf16["parameters"] * 2 == f32["parameters"]
    assert bf16["gradients"] == f32["gradients"]  # the step casts gradients to float32
    assert bf16["optimizer_state"] < 0.51 * f32["optimizer_state"]  # optax keeps moments in the param dtype
    wide = abstract_figures(MemorySpec("llama-tiny", param_dtype="bfloat16", state_dtype="float32"))
    assert wide["parameters"] == bf16["parameters"]
    assert wide["optimizer_state"] == f32["optimizer_state"]  # optimizer.state_dtype=float32 moments


def test_rl_stages_size_the_rollout_cache_and_ppo_its_critic():
    grpo = abstract_figures(
        MemorySpec("llama-tiny", stage="grpo", batch=2, group=4, prompt_len=8, new_tokens=24)
    )
    cfg = get_preset("llama-tiny")  # 2 layers x (k + v) x rows x KV heads x head_dim x slots, float32
    assert grpo["kv_cache"] >= 2 * 2 * 8 * cfg.num_kv_heads * cfg.head_dim * 32 * 4
    assert grpo["reference"] == 0  # rl.beta = 0 by default: no reference
    ppo = abstract_figures(MemorySpec("llama-tiny", stage="ppo"))
    sft = abstract_figures(MemorySpec("llama-tiny"))
    assert ppo["reference"] == sft["parameters"] < ppo["parameters"] < 2 * sft["parameters"]


def test_cli_table_and_json_with_the_compiled_figure(tmp_path, capsys):
    jax.devices()  # this process's one device: the compile runs here, no child process
    out = tmp_path / "memory.json"
    args = ["memory", "--preset", "llama-tiny", "--batch", "2", "--seq-len", "16", "--no-scan-layers"]
    assert main([*args, "--lora", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    for label in ("parameters", "gradients", "optimizer state", "activations (compiled temp)", "total"):
        assert label in table
    result = json.loads(out.read_text())
    rows = result["bytes_per_device"]
    assert rows["activations"] == result["compiled"]["gradients"]["temp"] > 0
    assert result["compiled"]["step"]["peak"] > result["compiled"]["gradients"]["argument"] > 0
    assert rows["total"] == sum(v for k, v in rows.items() if k != "total")
    assert result["settings"]["micro_batch"] == {"rows": 2, "length": 16}
    assert result["settings"]["lora_rank"] == 16


@pytest.mark.slow
def test_compile_in_a_child_process_with_more_devices():
    spec = MemorySpec("llama-tiny", (1, 2, 1), batch=2, seq_len=16)
    compiled = compiled_figures(spec)  # 2 devices: more than this process has
    gradients = abstract_figures(spec)["gradients"]
    assert 0 <= compiled["gradients"]["output"] - gradients <= 256  # the sharded gradients, and the loss
    assert compiled["step"]["peak"] > compiled["step"]["argument"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_compiles_its_gradients_and_its_step(stage):
    jax.devices()
    rl = dict(prompt_len=8, new_tokens=8, group=2) if stage in RL_STAGES else dict(seq_len=16)
    reference = True if stage == "grpo" else None  # grpo's KL penalty: the batch carries ref_logps
    # LoRA where it differs: dpo's reference is a view of the base, rm's and ppo's new heads train too
    lora = 4 if stage in ("dpo", "rm", "ppo") else None
    accum = 2 if stage == "sft" else 1
    spec = MemorySpec(
        "llama-tiny", batch=2, accum=accum, lora_rank=lora, reference=reference, scan_layers=False, **rl
    )
    compiled = compiled_figures(spec)
    assert compiled["gradients"]["temp"] > 0 and compiled["step"]["peak"] > compiled["gradients"]["argument"]
    # The gradient program's output: the loss's scalars and the gradients of what is trained, no more.
    assert 0 <= compiled["gradients"]["output"] - abstract_figures(spec)["gradients"] <= 256


def test_devices_fill_a_minus_one_axis(capsys):
    args = [
        "memory",
        "--preset",
        "llama-tiny",
        "--mesh",
        "fsdp=-1,tensor=2",
        "--devices",
        "8",
        "--no-compile",
    ]
    assert main(args) == 0
    assert "data=1,fsdp=4,tensor=2 (8 devices)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ --fit-gib


def _brute_force(need, limit, step, max_batch):
    return max((b for b in range(step, max_batch + 1, step) if need(b) <= limit), default=0)


@pytest.mark.parametrize("step", [1, 3, 8])
def test_largest_fit_finds_the_exact_largest_batch_in_few_plans(step):
    calls = []
    need = lambda b: 1000 + 100 * b
    for limit in range(1000, 1000 + 100 * 400, 137):
        calls.clear()
        fit = largest_fit(lambda b: calls.append(b) or need(b), limit, step=step, max_batch=300)
        assert fit.batch == _brute_force(need, limit, step, 300), (limit, step)
        assert len(calls) == len(set(calls)) == len(fit.tried) <= 2 * (300 // step).bit_length() + 1
        assert all(b % step == 0 for b in calls)
        if fit.batch:
            assert fit.need == need(fit.batch) <= limit
        if fit.next_batch is not None:
            assert fit.next_batch == fit.batch + step and fit.next_need == need(fit.next_batch) > limit


def test_largest_fit_when_nothing_fits_and_when_the_limit_is_never_reached():
    nothing = largest_fit(lambda b: 10 * b, 5, step=4)
    assert (nothing.batch, nothing.need, nothing.next_batch, nothing.next_need) == (0, None, 4, 40)
    assert list(nothing.tried) == [4]
    everything = largest_fit(lambda b: 7, 10, step=3, max_batch=100)  # the cap, rounded down to a step
    assert (everything.batch, everything.need, everything.next_batch) == (99, 7, None)
    assert list(everything.tried) == [3, 6, 12, 24, 48, 96, 99]
    assert largest_fit(lambda b: b, 64, max_batch=64).batch == 64  # exactly the cap, no extra plan
    with pytest.raises(ValueError):
        largest_fit(lambda b: b, 10, step=8, max_batch=4)


@pytest.mark.parametrize(
    "spec",
    [
        MemorySpec("llama-tiny", (1, 4, 1), accum=2),
        MemorySpec("llama-tiny", (2, 3, 1), stage="dpo"),
        MemorySpec("llama-tiny", (2, 1, 1), stage="grpo", group=3, minibatches=2),
        MemorySpec("llama-tiny", (1, 4, 1), stage="ppo", group=8, minibatches=4, accum=2),
    ],
)
def test_batch_step_is_the_smallest_batch_the_planner_accepts(spec):
    from jaxrl_llm.errors import UserError

    def accepted(batch: int) -> bool:
        try:
            dataclasses.replace(spec, batch=batch).check()
        except UserError:
            return False
        return True

    step = batch_step(spec)
    assert [b for b in range(1, 4 * step + 1) if accepted(b)] == [step, 2 * step, 3 * step, 4 * step]


def test_cli_fit_gib_searches_the_batch(tmp_path, capsys):
    """grpo with --no-compile: the rollout cache is what grows with the prompts, so the search is real and
    fast; the limit is exactly 37 prompts' plan."""
    shape = dict(stage="grpo", group=2, prompt_len=8, new_tokens=8)
    rows = ("parameters", "gradients", "optimizer_state", "reference", "kv_cache")
    need = lambda b: sum(abstract_figures(MemorySpec("llama-tiny", batch=b, **shape))[r] for r in rows)
    limit_gib = need(37) / 2**30
    args = ["memory", "--preset", "llama-tiny", "--stage", "grpo", "--group", "2", "--prompt-len", "8"]
    args += ["--new-tokens", "8", "--no-compile", "--fit-gib", repr(limit_gib)]
    assert main([*args, "--json", str(tmp_path / "fit.json")]) == 0
    out = capsys.readouterr().out
    line = f"largest batch that fits in {limit_gib:g} GiB at prompt-len 8 + new-tokens 8, group 2: 37 ("
    assert line in out and "; 38 needs " in out
    result = json.loads((tmp_path / "fit.json").read_text())
    fit = result["fit"]
    assert (fit["batch"], fit["next_batch"], fit["step"]) == (37, 38, 1)
    assert (fit["total_bytes"], fit["next_total_bytes"]) == (need(37), need(38))
    assert result["settings"]["batch"] == 37 and result["bytes_per_device"]["total"] == need(37)
    assert list(fit["tried_gib"]) == ["1", "2", "4", "8", "16", "32", "64", "48", "40", "36", "38", "37"]

    assert main([*args[:-1], "0.0001"]) == 0  # below the smallest batch's parameters alone
    assert "nothing fits in 0.0001 GiB" in capsys.readouterr().out
    sft = ["memory", "--preset", "llama-tiny", "--no-compile", "--fit-gib", "1", "--fit-max", "40"]
    assert main(sft) == 0  # no activations: sft's need does not grow with the batch
    out = capsys.readouterr().out
    assert "largest batch that fits in 1 GiB at seq-len 256: 40 (" in out
    assert "the search stopped at --fit-max 40 below the limit" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "llama-tiyn"], "Did you mean 'llama-tiny'"),
        (["--preset", "llama-tiny", "--mesh", "fsdp=0"], "every size must be >= 1"),
        (["--preset", "llama-tiny", "--mesh", "model=2"], "axis=size pairs"),
        (["--preset", "llama-tiny", "--mesh", "fsdp=4,tensor=2", "--devices", "4"], "need 8 devices but 4"),
        (["--preset", "llama-tiny", "--mesh", "fsdp=-1,tensor=3", "--devices", "8"], "not divisible by 3"),
        (
            ["--preset", "llama-tiny", "--mesh", "fsdp=4", "--batch", "6"],
            "cannot be split over data x fsdp = 4",
        ),
        (
            ["--preset", "llama-tiny", "--mesh", "fsdp=2", "--accum", "2", "--batch", "6"],
            "in 2 micro-batches",
        ),
        (["--preset", "llama-tiny", "--stage", "grpo", "--mesh", "data=4", "--batch", "2"], "2 prompts"),
        (["--preset", "llama-tiny", "--group", "4"], "--group: stage 'sft' does not take it"),
        (["--preset", "llama-tiny", "--stage", "grpo", "--seq-len", "9"], "--seq-len: stage 'grpo'"),
        (["--preset", "llama-tiny", "--stage", "kto", "--no-reference"], "always reads its reference"),
        (["--preset", "llama-tiny", "--reference"], "stage 'sft' has no reference"),
        (["--preset", "llama-tiny", "--batch", "0"], "--batch=0: must be at least 1"),
        (["--preset", "llama-tiny", "--fit-gib", "0"], "--fit-gib 0: must be above 0"),
        (["--preset", "llama-tiny", "--mesh", "fsdp=4", "--fit-gib", "1", "--fit-max", "2"], "--fit-max 2"),
        (["--preset", "llama-tiny", "--fit-gib", "1", "--lora-rank", "0"], "--lora-rank=0"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(args, message, capsys):
    assert main(["memory", *args, "--no-compile"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
