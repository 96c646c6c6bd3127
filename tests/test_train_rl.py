"""Stages grpo and ppo through the real command, from the vendored SFT model on synthetic arithmetic prompts:
metrics and samples, evaluation before and after, the one-program iteration (device rewards) and the single
host round trip (host rewards), both paths equal, dynamic sampling, exact resume after a crash, failing
rewards counted and excluded, config errors, PPO's critic and export, the 8-device mesh."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxrl_llm.reward.base import REGISTRY, register
from jaxrl_llm.train import __main__ as train_main
from jaxrl_llm.train import rl_iteration
from jaxrl_llm.train.step import Compiled
from tests.simulated_devices import run_on_cpu_devices

ROOT = Path(__file__).resolve().parents[1]
SFT_MODEL = ROOT / "tests" / "data" / "models" / "arith-sft"
ANSWER_MATCH = '[{"name": "answer_match", "params": {"ignore_ids": ["<|im_end|>"]}}]'
MATH_VERIFY = '[{"name": "math_verify"}]'
RL = [
    "--config",
    str(ROOT / "configs" / "base.py"),
    "--config.stage=grpo",
    f"--config.model.path={SFT_MODEL}",
    "--config.data.path=synthetic:arithmetic_rl?n=200&digits=2&seed=3",
    "--config.render.template=chatml",
    "--config.rollout.max_new_tokens=6",
    "--config.rl.prompts_per_iteration=4",
    "--config.rl.group_size=4",
    "--config.optimizer.lr=1e-3",
    "--config.optimizer.warmup_steps=0",
    "--config.train.steps=4",
    "--config.train.log_every=2",
    "--config.train.save_every=2",
    "--config.train.eval_every=4",
]
HELD_OUT = "--config.data.eval_split=0.1"  # 20 prompts


def train(run_dir: Path, *args: str) -> int:
    return train_main.main([*RL, f"--config.run_dir={run_dir}", *args])


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def metrics(run_dir: Path, split: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def final_params(run_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


class Instrumented:
    """Counts, per RL iteration, the compiled programs it runs and its explicit device -> host fetches, and
    forbids implicit ones (a hidden host round trip would raise)."""

    def __init__(self, monkeypatch):
        self.programs: list[int] = []
        self.fetches: list[int] = []
        calls, fetches = [0], [0]
        real_call, real_iteration, real_get = (
            Compiled.__call__,
            rl_iteration.RLIteration.__call__,
            jax.device_get,
        )

        def counted_call(compiled, *args):
            calls[0] += 1
            return real_call(compiled, *args)

        def counted_get(x):
            fetches[0] += 1
            return real_get(x)

        def iteration(it, state, step, rng):
            calls[0] = fetches[0] = 0
            with jax.transfer_guard_device_to_host("disallow"):
                out = real_iteration(it, state, step, rng)
            self.programs.append(calls[0])
            self.fetches.append(fetches[0])
            return out

        monkeypatch.setattr(Compiled, "__call__", counted_call)
        monkeypatch.setattr(rl_iteration.RLIteration, "__call__", iteration)
        monkeypatch.setattr(rl_iteration.jax, "device_get", counted_get)


def _instrumented(tmp_path_factory, name: str, rewards: str):
    mp = pytest.MonkeyPatch()
    counts = Instrumented(mp)
    run_dir = tmp_path_factory.mktemp("rl") / name
    try:
        assert train(run_dir, HELD_OUT, f"--config.reward.functions={rewards}") == 0
    finally:
        mp.undo()
    return run_dir, counts.programs, counts.fetches


@pytest.fixture(scope="module")
def fused_run(tmp_path_factory):
    """GRPO with a device reward, held-out evaluation, instrumented: ``(run_dir, programs, fetches)``."""
    return _instrumented(tmp_path_factory, "fused", ANSWER_MATCH)


@pytest.fixture(scope="module")
def host_run(tmp_path_factory):
    """The same run with a host reward (math_verify gives the same rewards here), instrumented."""
    return _instrumented(tmp_path_factory, "host", MATH_VERIFY)


def test_a_grpo_run_logs_rewards_advantages_samples_and_evaluates_before_and_after(fused_run):
    run_dir, _, _ = fused_run
    result = summary(run_dir)
    assert result["steps"] == 4 and result["updates"] == 4
    assert 0.0 <= result["eval/exact_match_start"] <= 1.0 and 0.0 <= result["eval/exact_match"] <= 1.0
    assert result["first_eval"]["samples"] == 20
    train_lines = metrics(run_dir)
    assert [r["step"] for r in train_lines] == [2, 4]
    line = train_lines[-1]
    for key in (
        "reward/answer_match/mean",
        "reward/total/mean",
        "reward/total/group_std",
        "reward/total/zero_std_groups",
        "advantage/mean",
        "advantage/std",
        "advantage/baseline_bias",
        "entropy",
        "clip_frac/low",
        "clip_frac/high",
        "ratio/mean",
        "ratio/max",
        "rollout/mismatch_kl",
        "rollout/mismatch_max",
        "completion/length_mean",
        "completion/length_max",
        "completion/truncated",
        "grad_norm",
        "learning_rate",
        "step_s",
        "tokens_per_s",
    ):
        assert key in line and math.isfinite(line[key]), key
    # The sampler and the trainer read the same fp32 weights: their log-probs of the same tokens agree.
    assert line["rollout/mismatch_max"] < 1e-4
    assert abs(line["advantage/mean"]) < 1e-5  # group-normalised
    evals = metrics(run_dir, "eval")
    assert [r["step"] for r in evals] == [0, 4] and "exact_match" in evals[0]
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {2, 4} and len(samples) == 8
    assert {"prompt", "completion", "reward", "advantage", "finish_reason", "ground_truth"} <= set(samples[0])
    assert samples[0]["prompt"].startswith("What is ")
    assert (run_dir / "final" / "model.safetensors").exists()


def test_with_device_rewards_an_iteration_is_one_program_and_never_reads_the_device(fused_run):
    _, programs, fetches = fused_run
    assert programs == [1, 1, 1, 1]
    assert fetches == [0, 0, 0, 0]


def test_with_host_rewards_an_iteration_leaves_the_device_once(host_run):
    run_dir, programs, fetches = host_run
    assert programs == [2, 2, 2, 2]  # the rollout, then the update
    assert fetches == [1, 1, 1, 1]  # the completions, scored on the host
    line = metrics(run_dir)[-1]
    for key in ("time/rollout_s", "time/reward_s", "time/update_s", "time/rollout_tokens_per_s"):
        assert line[key] > 0, key


def test_host_and_device_rewards_train_the_same_model(fused_run, host_run):
    fused, host = final_params(fused_run[0]), final_params(host_run[0])
    for name, value in fused.items():
        np.testing.assert_allclose(host[name], value, atol=2e-5, err_msg=name)
    assert summary(host_run[0])["eval/exact_match"] == summary(fused_run[0])["eval/exact_match"]


@pytest.mark.slow
def test_a_crashed_run_resumes_exactly(fused_run, tmp_path, monkeypatch):
    real = rl_iteration.RLIteration.__call__

    def crash_at_step_3(it, state, step, rng):
        if step == 3:
            raise RuntimeError("simulated preemption")
        return real(it, state, step, rng)

    monkeypatch.setattr(rl_iteration.RLIteration, "__call__", crash_at_step_3)
    run_dir = tmp_path / "crashed"
    args = (HELD_OUT, f"--config.reward.functions={ANSWER_MATCH}")
    with pytest.raises(RuntimeError, match="simulated preemption"):
        train(run_dir, *args)
    monkeypatch.setattr(rl_iteration.RLIteration, "__call__", real)
    assert train(run_dir, *args) == 0
    result = summary(run_dir)
    assert result["resumed_from"] == 2
    assert result["params_sha256"] == summary(fused_run[0])["params_sha256"]
    assert [r["step"] for r in metrics(run_dir)] == [2, 4]  # step 4's line written once, by the resumed run


@pytest.mark.slow
def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_last_complete_one(
    fused_run, tmp_path, capsys
):
    import signal

    from tests.fault_worker import checkpoints, run_worker

    args = (HELD_OUT, f"--config.reward.functions={ANSWER_MATCH}")  # fused_run's
    run_dir = tmp_path / "killed"
    killed = run_worker("kill-mid-save", 4, *RL, f"--config.run_dir={run_dir}", *args)  # SIGKILL mid-write
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert checkpoints(run_dir) == [2]  # step 4 was being written: never listed as a checkpoint
    assert list((run_dir / "checkpoints").glob("4.orbax-checkpoint-tmp*"))

    capsys.readouterr()
    assert train(run_dir, *args) == 0
    assert "the checkpoint of step 4 was never finished" in capsys.readouterr().out
    assert summary(run_dir)["resumed_from"] == 2
    assert summary(run_dir)["params_sha256"] == summary(fused_run[0])["params_sha256"]
    assert checkpoints(run_dir) == [2, 4]


@pytest.mark.slow
def test_dynamic_sampling_refills_flat_groups_the_same_on_both_paths(tmp_path):
    args = ("--config.rl.algorithm=dapo", "--config.train.steps=2", "--config.rl.dynamic_sampling_rounds=2")
    assert train(tmp_path / "fused", *args, f"--config.reward.functions={ANSWER_MATCH}") == 0
    assert train(tmp_path / "host", *args, f"--config.reward.functions={MATH_VERIFY}") == 0
    fused, host = metrics(tmp_path / "fused")[-1], metrics(tmp_path / "host")[-1]
    for key in ("dynamic_sampling/flat_groups", "dynamic_sampling/extra_rounds", "dynamic_sampling/unfilled"):
        assert fused[key] == pytest.approx(host[key]), key
    # The SFT model answers most problems right every time: flat groups are common and get refilled.
    assert fused["dynamic_sampling/flat_groups"] > 0
    assert fused["reward/total/zero_std_groups"] <= fused["dynamic_sampling/unfilled"] + 1e-6
    a, b = final_params(tmp_path / "fused"), final_params(tmp_path / "host")
    for name, value in a.items():
        np.testing.assert_allclose(b[name], value, atol=2e-5, err_msg=name)


@register("flaky_test_reward", "host")
def flaky(completion: str, record, **_) -> float | None:
    """Raises on answers ending in 1, NaN on those ending in 2, else exact match."""
    if completion.endswith("1"):
        raise ValueError("flaky reward fails")
    if completion.endswith("2"):
        return float("nan")
    return float(completion.strip() == str(record["ground_truth"]))


@pytest.mark.slow
def test_a_reward_that_raises_or_returns_nan_is_counted_and_excluded(tmp_path):
    assert "flaky_test_reward" in REGISTRY
    code = train(
        tmp_path / "flaky",
        '--config.reward.functions=[{"name": "flaky_test_reward"}]',
        "--config.reward.on_error=exclude",
        "--config.train.steps=2",
        "--config.train.log_every=1",
    )
    assert code == 0
    lines = metrics(tmp_path / "flaky")
    errors = sum(r.get("reward/flaky_test_reward/errors", 0) for r in lines)
    assert errors > 0
    assert min(r["samples/counted"] for r in lines) < 1.0
    assert all(math.isfinite(r["loss"]) for r in lines)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.rl.group_size=1"], "a group of one sample has no spread to scale by"),
        (["--config.rl.group_size=1", "--config.rl.algorithm=rloo"], "no other members for a baseline"),
        (["--config.reward.functions=[]"], "needs at least one reward"),
        (["--config.rl.minibatches=3"], "must split evenly into the minibatches"),
        (
            ["--config.rl.minibatches=2", "--config.train.grad_accum_steps=3"],
            "split evenly into the micro-batches",
        ),
    ],
)
def test_rl_config_mistakes_are_named(tmp_path, capsys, args, message):
    assert train(tmp_path / "x", f"--config.reward.functions={MATH_VERIFY}", *args) == 2
    assert message in capsys.readouterr().err


def test_prompts_the_mesh_cannot_split_are_a_clear_error():
    from types import SimpleNamespace

    from jaxrl_llm.errors import UserError
    from jaxrl_llm.train.grpo import check_mesh

    cfg = SimpleNamespace(
        rl=SimpleNamespace(prompts_per_iteration=3, group_size=4, minibatches=1),
        train=SimpleNamespace(grad_accum_steps=1),
    )
    mesh = SimpleNamespace(shape={"data": 2, "fsdp": 1, "tensor": 1})
    with pytest.raises(
        UserError, match="rl.prompts_per_iteration = 3 rows cannot be split over the mesh's 2"
    ):
        check_mesh(cfg, mesh)
    cfg.rl.prompts_per_iteration = 4
    check_mesh(cfg, mesh)


def test_more_prompts_an_iteration_than_the_data_holds_is_a_clear_error(tmp_path, capsys):
    code = train(
        tmp_path / "x",
        f"--config.reward.functions={ANSWER_MATCH}",
        "--config.data.path=synthetic:arithmetic_rl?n=3&digits=2",
    )
    assert code == 2
    assert "rl.prompts_per_iteration=4 exceeds the 3 training prompts" in capsys.readouterr().err


@pytest.mark.slow
def test_ppo_trains_a_policy_and_critic_and_exports_the_policy(tmp_path):
    from jaxrl_llm.models import load_hf

    run_dir = tmp_path / "ppo"
    code = train(
        run_dir,
        "--config.stage=ppo",
        f"--config.reward.functions={ANSWER_MATCH}",
        "--config.rl.group_size=2",
        "--config.rl.minibatches=2",
        "--config.rl.kl_target=0.5",
        "--config.train.steps=2",
        "--config.train.log_every=1",
    )
    assert code == 0
    lines = metrics(run_dir)
    for key in ("value_loss", "policy_loss", "value_clip_frac", "value/mean", "kl_coef", "kl/sequence"):
        assert all(math.isfinite(r[key]) for r in lines), key
    assert lines[0]["kl_coef"] == pytest.approx(0.05)
    assert lines[1]["kl_coef"] != pytest.approx(0.05)  # adapted towards rl.kl_target, carried in the state
    assert summary(run_dir)["updates"] == 4
    exported = load_hf(run_dir / "final")  # the policy alone, a causal LM
    assert exported.cfg.vocab_size == load_hf(SFT_MODEL).cfg.vocab_size
    config = json.loads((run_dir / "final" / "config.json").read_text())
    assert config["architectures"][0].endswith("ForCausalLM")


@pytest.mark.slow
def test_the_critic_starts_as_the_policys_backbone_or_a_reward_model(tmp_path):
    from flax import nnx

    from jaxrl_llm.models import create_model, load_hf, save_hf
    from jaxrl_llm.models.actor_critic import ActorCritic, critic_like

    policy = load_hf(SFT_MODEL)
    critic = critic_like(policy)
    for part in ("embed", "blocks", "final_norm"):
        for a, b in zip(
            jax.tree.leaves(nnx.state(critic)[part]), jax.tree.leaves(nnx.state(policy)[part]), strict=True
        ):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens = np.ones((1, 5), np.int32)
    assert np.all(np.asarray(critic(tokens)) == 0.0)  # zero value head
    other = create_model(policy.cfg.replace(vocab_size=policy.cfg.vocab_size + 1), head="score")
    with pytest.raises(ValueError, match="vocabulary"):
        ActorCritic(policy, other)
    reward_model = create_model(policy.cfg, head="score", seed=7)
    save_hf(reward_model, tmp_path / "rm")
    run_dir = tmp_path / "ppo"
    code = train(
        run_dir,
        "--config.stage=ppo",
        f"--config.reward.functions={ANSWER_MATCH}",
        f"--config.rl.critic_path={tmp_path / 'rm'}",
        "--config.train.steps=1",
        "--config.optimizer.lr=1e-9",
    )
    assert code == 0
    values = metrics(run_dir)[-1]["value/mean"]
    assert values != 0.0  # the reward model's head, not a zero one


@pytest.mark.slow
def test_the_sharded_iteration_on_8_devices_equals_one_device(fused_run, tmp_path):
    out = tmp_path / "sharded"
    run_on_cpu_devices(["-m", "tests.rl_8dev", str(out)], 8, "8-device RL run finished")
    want, got = final_params(fused_run[0]), final_params(out)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, atol=5e-5, err_msg=name)


ROLES = (
    "--config.lora.rank=4",
    "--config.rl.beta=0.04",
    "--config.train.steps=2",
    "--config.train.log_every=1",
)


def roles_reward(reward_model: Path | str) -> str:
    """The exact answer and a learned reward model's score (a tenth of it)."""
    functions = [
        {"name": "answer_match", "params": {"ignore_ids": ["<|im_end|>"]}},
        {"name": "reward_model", "weight": 0.1, "params": {"path": str(reward_model), "batch_size": 4}},
    ]
    return f"--config.reward.functions={json.dumps(functions)}"


@pytest.mark.slow
def test_rollouts_on_a_mesh_of_their_own_equal_the_collocated_run(fused_run, tmp_path, monkeypatch):
    """8 devices split 4 + 4: training on data=2 x fsdp=2, rollouts on data=2 x tensor=2 with the weights
    resharded each iteration, equal the one-device run; one step off-policy (the next rollout overlapping the
    update, corrected by rl.rollout_is) starts the same and then learns from one-step-stale samples. And a
    LoRA run with a KL penalty and a learned reward model, every role on 2 devices of its own (the adapters
    sent to the rollouts, the base copied once to the rollout and reference meshes), equals the same run on
    one device, where the reference is a view of the policy's weights with the adapters off (no copy)."""
    from jaxrl_llm.models import load_hf, save_hf
    from jaxrl_llm.train import stages

    reward_model = tmp_path / "rm"
    shutil.copytree(SFT_MODEL, reward_model)  # its tokenizer and template
    save_hf(load_hf(SFT_MODEL, head="score"), reward_model)
    made = []
    real = stages.frozen_models
    monkeypatch.setattr(stages, "frozen_models", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    one = tmp_path / "roles_one"
    assert train(one, *ROLES, roles_reward(reward_model)) == 0
    (frozen,) = made
    assert frozen.names == ("reference",) and jax.tree.leaves(frozen) == []  # no copy of the base
    assert (one / "adapter" / "adapter_model.safetensors").is_file()
    args = ["-m", "tests.rl_8dev", str(tmp_path), "split", str(reward_model)]
    run_on_cpu_devices(args, 8, "split-mesh RL runs finished")
    roles, want = final_params(tmp_path / "roles"), final_params(one)
    for name, value in roles.items():
        np.testing.assert_allclose(value, want[name], atol=5e-5, err_msg=name)
    for a, b in zip(metrics(tmp_path / "roles"), metrics(one), strict=True):
        for key in ("reward/total/mean", "reward/reward_model/mean", "kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
        assert a["time/reference_s"] > 0 and a["time/reshard_s"] > 0 and "time/reference_s" not in b
    split, stale = tmp_path / "split", tmp_path / "off_policy"
    want = final_params(fused_run[0])
    for name, value in final_params(split).items():
        np.testing.assert_allclose(value, want[name], atol=5e-5, err_msg=name)
    ours, theirs = metrics(split), metrics(fused_run[0])
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert a["reward/total/mean"] == pytest.approx(b["reward/total/mean"], abs=1e-6)
        assert a["time/reshard_s"] > 0 and "time/reshard_s" not in b
    off = metrics(stale)
    assert len(off) == len(ours) and all(r["time/reshard_s"] > 0 and np.isfinite(r["loss"]) for r in off)
    # On-policy the sampler's log-probs are the trainer's up to float noise; one update stale they are not.
    assert ours[-1]["rollout/mismatch_max"] < 1e-4 < off[-1]["rollout/mismatch_max"]
    assert not np.allclose(
        final_params(stale)["model.embed_tokens.weight"], want["model.embed_tokens.weight"]
    )


@pytest.mark.slow
def test_the_gsm8k_recipe_runs_on_a_tiny_model_with_the_qwen_tokenizer(tmp_path):
    """configs/gsm8k_grpo.py as written (bf16 compute and rollouts, rollout correction, remat, the tokenizer's
    own chat template, GSM8K through the data layer, math_verify), with only its size shrunk for a CPU."""
    run_dir = tmp_path / "gsm8k"
    gsm8k = ROOT / "tests" / "data" / "gsm8k" / "test.jsonl"
    code = train_main.main(
        [
            "--config",
            str(ROOT / "configs" / "gsm8k_grpo.py"),
            f"--config.run_dir={run_dir}",
            "--config.model.path=",
            "--config.model.preset=qwen2-tiny",
            f"--config.tokenizer.path={ROOT / 'tests' / 'data' / 'tokenizers' / 'qwen2.5-instruct'}",
            f"--config.data.path={gsm8k}",
            f"--config.data.eval_path={gsm8k}",
            "--config.rl.eval_prompts=4",
            "--config.rl.prompts_per_iteration=2",
            "--config.rl.group_size=2",
            "--config.rollout.max_new_tokens=4",
            "--config.train.grad_accum_steps=1",
            "--config.train.steps=1",
            "--config.optimizer.warmup_steps=0",
            "--config.train.export_hf=false",
        ]
    )
    assert code == 0
    line = metrics(run_dir)[-1]
    assert line["completion/tokens"] > 0 and "rollout/is_weight" in line
    assert 0 < line["rollout/mismatch_max"]  # bf16 rollouts, fp32 trainer log-probs... in bf16 compute too
    result = summary(run_dir)
    assert result["first_eval"]["samples"] == 4 and "exact_match" in result["first_eval"]
    manifest = json.loads((run_dir / "run_info.json").read_text())
    assert "qwen2.5-instruct" in json.dumps(manifest["tokenizer"]).lower()
