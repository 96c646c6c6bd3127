"""One process of a multi-process training run of every stage (tests/test_multiprocess.py).

    python tests/stages_worker.py OUT PROCESS_ID NUM_PROCESSES COORDINATOR STAGE [STAGE ...]

trains each STAGE through the real command (``python -m jaxrl_llm.train``) into ``OUT/<stage>`` on all the
devices of all the processes (NUM_PROCESSES 1: this process alone), with a tiny model and a few steps logged
at every step, so two processes x 2 devices can be compared step by step with one process x 4 devices. The
sft run is then resumed for one more step from its last checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jaxrl_llm.train import __main__ as train_main

ROOT = Path(__file__).resolve().parents[1]
SFT_MODEL = ROOT / "tests" / "data" / "models" / "arith-sft"

COMMON = [
    "--config.optimizer.warmup_steps=0",
    "--config.train.steps=2",
    "--config.train.log_every=1",
    "--config.train.save_every=2",
]
HELD_OUT = ["--config.data.eval_split=0.1", "--config.train.eval_every=2"]  # evaluated across processes too
TINY = [
    "--config.model.preset=llama-tiny",
    "--config.tokenizer.train_vocab_size=128",
    "--config.render.template=chatml",
    "--config.optimizer.lr=3e-3",
    "--config.train.batch_size=4",
    "--config.train.seq_len=64",
]
RL = [
    f"--config.model.path={SFT_MODEL}",
    "--config.render.template=chatml",
    "--config.data.path=synthetic:arithmetic_rl?n=120&digits=2&seed=3",
    "--config.rollout.max_new_tokens=6",
    "--config.rl.prompts_per_iteration=4",
    "--config.rl.group_size=4",
    "--config.optimizer.lr=1e-4",
]
PAIRS = "--config.data.path=synthetic:arithmetic_pref?n=120&digits=2"
STAGES = {
    "sft": [*TINY, *HELD_OUT, "--config.data.path=synthetic:arithmetic?n=120&digits=2"],
    "pt": [*TINY, "--config.data.path={text}"],
    "rm": [*TINY, PAIRS],
    # the reference log-prob table of every training and held-out pair, built across processes
    "dpo": [*TINY, *HELD_OUT, PAIRS, "--config.pref.precompute_ref=true"],
    "kto": [*TINY, "--config.data.path=synthetic:arithmetic_kto?n=120&digits=2"],
    "orpo": [*TINY, PAIRS],
    "simpo": [*TINY, PAIRS],
    # host rewards (rollout on a mesh of its own, one device of each process; scoring on every process;
    # update) and a held-out greedy evaluation
    "grpo": [
        *RL,
        *HELD_OUT,
        "--config.rl.eval_prompts=8",
        '--config.reward.functions=[{"name": "math_verify"}]',
        "--config.rollout.mesh=data=2",
    ],
    # device rewards; the reference on a mesh of its own (one device of each process)
    "ppo": [*RL, '--config.reward.functions=[{"name": "answer_match"}]', "--config.rl.reference_mesh=data=2"],
}
RESUMED = [
    "--config.train.steps=3"
]  # sft again: restores step 2's checkpoint across processes, one more step


def main(out: Path, process_id: int, processes: int, coordinator: str, stages: list[str]) -> None:
    text, mine = out / "text.jsonl", out / f"text.{process_id}.jsonl"  # every process writes the same file
    lines = [{"text": f"Line {i}: the quick brown fox jumps over {i} lazy dogs."} for i in range(40)]
    out.mkdir(parents=True, exist_ok=True)
    mine.write_text("".join(json.dumps(x) + "\n" for x in lines))
    mine.replace(text)
    parallel = [f"--config.parallel.num_processes={processes}", f"--config.parallel.process_id={process_id}"]
    if processes > 1:
        parallel.append(f"--config.parallel.coordinator_address={coordinator}")
    for stage in stages:
        args = [a.replace("{text}", str(text)) for a in STAGES[stage]]
        code = train_main.main(
            [f"--config.stage={stage}", *COMMON, *args, *parallel, f"--config.run_dir={out / stage}"]
        )
        assert code == 0, f"stage {stage} exited {code}"
        if stage == "sft":
            code = train_main.main(
                [
                    f"--config.stage={stage}",
                    *COMMON,
                    *args,
                    *parallel,
                    f"--config.run_dir={out / stage}",
                    *RESUMED,
                ]
            )
            assert code == 0, f"resumed stage {stage} exited {code}"
        print(f"process {process_id}: {stage} done", flush=True)


if __name__ == "__main__":
    out_dir, index, count, address, *names = sys.argv[1:]
    main(Path(out_dir), int(index), int(count), address, names)
