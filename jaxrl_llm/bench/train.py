"""Training-step throughput: tokens/s, step time, compile time and the fraction of the matmul peak.

The step is the one training runs (``jaxrl_llm.train.step``: jitted, sharded over every local device,
state donated, compiled ahead of time) with AdamW, on a synthetic batch of random tokens:

- ``sft``: ``batch`` full rows of ``seq_len`` tokens, every token a target (``sft_batch``).
- ``dpo`` and ``rm``: ``batch`` preference pairs (``pair_tokens``): each side is the pair's ``prompt_len``
  prompt tokens followed by its own ``completion_len`` completion tokens (the targets). Training batches
  a pair as one row ``prompt | chosen | rejected`` of ``P + 2C`` tokens (``pair_batch``), reading the
  prompt once; tokens are still counted as the two sequences ``prompt + completion`` that a pair is (and
  that the TRL peer reads), ``B * 2 * (P + C)`` a step, while FLOPs count the ``B`` rows actually read.
  ``dpo`` is ``dpo_objective(beta=0.1)`` (sigmoid loss). Its reference log-probs come, as in the ``dpo``
  stage, from a frozen copy of the initial weights: with ``reference="live"`` (the stage's way) the update
  computes them inside its compiled program (the copy is its ``frozen`` argument), so their time is part of
  the step's; with ``"precomputed"`` they are computed once up front (what one pass before training buys)
  and only the step is timed. ``reference_s`` is the reference forward's own time either way. ``rm`` trains
  a score-head model (``*ForSequenceClassification``) with ``rm_objective()``; there is no reference.

FLOPs are counted as 3 forwards (forward + backward), the standard 6N-per-token estimate plus attention
(``forward_flops``; a score model's head is one column instead of the vocabulary), plus 1 forward for a
live reference; the peak is this machine's matmul FLOP/s measured in the same run (times the device count).
``compile_s`` is the training step's compile time (``reference_compile_s`` the reference forward's);
``first_loss`` is the first step's loss (``log 2`` for DPO, where the policy is still the reference).
``other_load_cores`` (and ``peer_other_load_cores``) is how many cores' worth of CPU other processes used
while the steps ran: a comparison is only fair on an otherwise idle machine (see ``_OtherLoad``).

With ``compare_trl`` the same initial weights and token ids then run through TRL's trainer for the same
objective (``jaxrl_llm.bench.peer``: ``SFTTrainer``, ``DPOTrainer`` with its own live or precomputed
reference, ``RewardTrainer``) at the same batch, lengths and dtypes, and the ratio of tokens/s (ours over
TRL's) is reported as ``speedup``. The peer runs one micro-batch per step without activation
checkpointing, so the comparison refuses ``accum_steps > 1`` and ``remat != "none"``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .forward import forward_flops
from .peak import matmul_flops_per_s

OBJECTIVES = ("sft", "dpo", "rm", "grpo")  # grpo: bench.rl
PAIR_OBJECTIVES = ("dpo", "rm")
REFERENCES = ("live", "precomputed")
DEFAULT_SEQ_LEN = 256
DEFAULT_PROMPT_LEN = DEFAULT_COMPLETION_LEN = 64
DPO_BETA = 0.1


def sft_batch(vocab_size: int, batch: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One document per row, every token a target (what a packed pre-training batch looks like)."""
    rs = np.random.RandomState(seed)
    return {
        "tokens": rs.randint(0, vocab_size, (batch, seq_len)).astype(np.int32),
        "loss_mask": np.ones((batch, seq_len), bool),
        "segment_ids": np.ones((batch, seq_len), np.int32),
        "positions": np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1)),
        "num_truncated": np.zeros((batch,), np.int32),
    }


def pair_tokens(
    vocab_size: int, batch: int, prompt_len: int, completion_len: int, seed: int = 0
) -> np.ndarray:
    """int32[B, 2, P + C]: ``batch`` preference pairs, a random prompt shared by both sides of a pair, then
    a random completion of its own on each side (what the TRL peer is given).

    Token ids start at 1: 0 is the TRL peer's pad id, which HF's sequence classifier would take for padding.
    """
    rs = np.random.RandomState(seed)
    prompt = rs.randint(1, vocab_size, (batch, 1, prompt_len))
    completions = rs.randint(1, vocab_size, (batch, 2, completion_len))
    return np.concatenate([np.repeat(prompt, 2, axis=1), completions], axis=-1).astype(np.int32)


def pair_batch(tokens: np.ndarray, prompt_len: int) -> dict[str, np.ndarray]:
    """The pairs of ``pair_tokens`` as training batches them (``data.packing.pad_pair``): one row
    ``prompt | chosen | rejected`` of ``P + 2C`` tokens per pair, the completions the only targets."""
    from ..data.packing import pad_pair

    batch, _, length = tokens.shape
    row_length = 2 * length - prompt_len
    mask = np.arange(length) >= prompt_len
    rows = [
        pad_pair(
            {"ids": pair[0], "loss_mask": mask},
            {"ids": pair[1], "loss_mask": mask},
            (row_length,),
            prompt_len=prompt_len,
            max_side=length,
        )
        for pair in tokens
    ]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _train_model(spec: str, param_dtype: str, dtype: str, remat: str = "none", head: str = "lm"):
    """Mixed precision as training runs it: parameters (and the optimizer) in ``param_dtype``, compute in
    ``dtype``, logits and loss in float32."""
    from pathlib import Path

    from ..models import create_model, get_preset, load_hf

    if Path(spec).is_dir():
        return load_hf(spec, dtype=param_dtype, compute_dtype=dtype, remat=remat, head=head)
    cfg = get_preset(spec, param_dtype=param_dtype, dtype=dtype, remat=remat)
    return create_model(cfg, seed=0, head=head)


def check_train_args(
    objective: str,
    *,
    seq_len: int | None = None,
    prompt_len: int | None = None,
    completion_len: int | None = None,
    reference: str | None = None,
    compare_trl: bool = False,
    accum_steps: int = 1,
    remat: str = "none",
    flag: Callable[[str], str] = str,
) -> tuple[int | None, int | None, int | None, str | None]:
    """``(seq_len, prompt_len, completion_len, reference)`` with their defaults filled in, or a
    ``ValueError`` naming the argument (as ``flag(name)`` spells it) that ``objective`` does not take.

    ``compare_trl`` refuses what the TRL peer cannot match: it runs one micro-batch per optimizer step and
    keeps every activation.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"{flag('objective')}={objective!r}: expected one of {', '.join(OBJECTIVES)}")
    if objective == "grpo":
        given = [
            flag(n) for n, v in (("seq_len", seq_len), ("completion_len", completion_len)) if v is not None
        ]
        if given:
            raise ValueError(
                f"{' and '.join(given)}: objective 'grpo' generates its completions; give --prompt-len and "
                "--new-tokens (and --prompts, --group) instead"
            )
        prompt_len = DEFAULT_PROMPT_LEN if prompt_len is None else prompt_len
        if prompt_len < 1:
            raise ValueError(f"{flag('prompt_len')}={prompt_len}: must be at least 1")
    elif objective == "sft":
        given = [
            flag(n)
            for n, v in (("prompt_len", prompt_len), ("completion_len", completion_len))
            if v is not None
        ]
        if given:
            raise ValueError(
                f"{' and '.join(given)}: objective 'sft' trains on full rows of {flag('seq_len')} tokens; "
                "prompt and completion lengths are for the pair objectives (dpo, rm)"
            )
        seq_len = DEFAULT_SEQ_LEN if seq_len is None else seq_len
    else:
        if seq_len is not None:
            raise ValueError(
                f"{flag('seq_len')}: objective {objective!r} trains on preference pairs; give "
                f"{flag('prompt_len')} and {flag('completion_len')} instead (each side of a pair is the prompt "
                "followed by its completion)"
            )
        prompt_len = DEFAULT_PROMPT_LEN if prompt_len is None else prompt_len
        completion_len = DEFAULT_COMPLETION_LEN if completion_len is None else completion_len
        if prompt_len < 1 or completion_len < 1:
            raise ValueError(
                f"{flag('prompt_len')}={prompt_len}, {flag('completion_len')}={completion_len}: "
                "both must be at least 1"
            )
    if objective == "dpo":
        reference = "live" if reference is None else reference
        if reference not in REFERENCES:
            raise ValueError(f"{flag('reference')}={reference!r}: expected one of {', '.join(REFERENCES)}")
    elif reference is not None:
        raise ValueError(
            f"{flag('reference')}={reference!r}: only objective 'dpo' has a reference model, not {objective!r}"
        )
    if compare_trl and accum_steps != 1:
        raise ValueError(
            f"{flag('compare_trl')} with {flag('accum_steps')}={accum_steps}: the TRL peer runs one "
            f"micro-batch per optimizer step; compare with {flag('accum_steps')}=1"
        )
    if compare_trl and remat != "none":
        raise ValueError(
            f"{flag('compare_trl')} with {flag('remat')}={remat!r}: the TRL peer runs without gradient "
            f"checkpointing; compare with {flag('remat')}=none"
        )
    return seq_len, prompt_len, completion_len, reference


class _OtherLoad:
    """Cores' worth of CPU that other processes used between ``start()`` and ``cores()``, from Linux's
    ``/proc/stat`` less this process's own CPU time (None where there is no ``/proc/stat``).

    On a shared machine the two sides of a comparison do not suffer alike: with one core taken by another
    process, PyTorch's OpenMP threads ran ~8x slower here and XLA's ~2x, so a speedup measured under load
    overstates ours. The result reports it so that a reader can tell.
    """

    def start(self) -> _OtherLoad:
        self.begin = self._sample()
        return self

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        import os
        import resource

        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
        own = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), busy, own.ru_utime + own.ru_stime

    def cores(self) -> float | None:
        end = self._sample()
        if self.begin is None or end is None or end[0] <= self.begin[0]:
            return None
        wall, busy, own = (e - b for e, b in zip(end, self.begin, strict=True))
        return round(max(busy - own, 0.0) / wall, 2)


def _timed_steps(run, repeats: int) -> tuple[list[float], object, object]:
    """``run()`` once (warm-up) then ``repeats`` times, each to completion: (times, first, last) outputs."""
    first = jax.block_until_ready(run())
    times, last = [], first
    for _ in range(repeats):
        start = time.perf_counter()
        last = jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return times, first, last


def bench_train(
    spec: str,
    *,
    objective: str = "sft",
    batch: int,
    seq_len: int | None = None,
    prompt_len: int | None = None,
    completion_len: int | None = None,
    reference: str | None = None,
    dtype: str = "float32",
    param_dtype: str = "float32",
    accum_steps: int = 1,
    remat: str = "none",
    repeats: int = 5,
    compare_trl: bool = False,
) -> dict:
    """Tokens/s of ``objective``'s training step (see the module docstring); ``seq_len`` (default 256) is
    for ``sft``, ``prompt_len`` and ``completion_len`` (default 64 each) for ``dpo`` and ``rm``,
    ``reference`` (``"live"`` by default) for ``dpo`` only."""
    from flax import nnx

    from ..data.pipeline import to_device
    from ..models import save_hf
    from ..objectives import dpo_objective, reference_logps, rm_objective, sft_objective
    from ..parallel import frozen_copy, make_mesh, place
    from ..train.optimizer import OptimizerConfig, make_optimizer, make_schedule
    from ..train.state import Frozen, TrainState
    from ..train.step import NO_FROZEN, build_update, compile_update

    seq_len, prompt_len, completion_len, reference = check_train_args(
        objective,
        seq_len=seq_len,
        prompt_len=prompt_len,
        completion_len=completion_len,
        reference=reference,
        compare_trl=compare_trl,
        accum_steps=accum_steps,
        remat=remat,
    )
    pairs = objective in PAIR_OBJECTIVES
    # Rows of ``length`` tokens the model reads a step: a pair is one row prompt | chosen | rejected.
    length = prompt_len + 2 * completion_len if pairs else seq_len
    rows = batch
    mesh = make_mesh()
    model = _train_model(spec, param_dtype, dtype, remat, head="score" if objective == "rm" else "lm")
    if compare_trl:  # the step donates the model's arrays: export the peer's copy of the weights first
        peer_dir = tempfile.TemporaryDirectory()
        save_hf(model, peer_dir.name)
    live = reference == "live"
    reference_model = NO_FROZEN
    if objective == "dpo":  # the frozen reference: a copy of the initial weights, as the dpo stage keeps
        ref_graphdef, ref_params = nnx.split(model)
        reference_model = Frozen(
            {"reference": frozen_copy(place(ref_params, mesh))}, (("reference", ref_graphdef),)
        )
    opt = OptimizerConfig(warmup_steps=0)
    tx = make_optimizer(opt, nnx.state(model, nnx.Param))
    graphdef, state = TrainState.create(model, tx, jax.random.key(0))
    state = place(state, mesh)
    model_cfg = model.cfg
    del model
    objective_fn = {
        "sft": sft_objective,
        "dpo": lambda: dpo_objective(beta=DPO_BETA),
        "rm": rm_objective,
    }[objective]()
    update = build_update(graphdef, objective_fn, tx, make_schedule(opt), accum_steps=accum_steps)
    if pairs:
        sides = pair_tokens(model_cfg.vocab_size, batch, prompt_len, completion_len)
        host_batch = pair_batch(sides, prompt_len)
    else:
        host_batch = sft_batch(model_cfg.vocab_size, batch, seq_len)
    device_batch = to_device(host_batch, mesh)
    rng = jax.random.key(1)
    reference_times: dict[str, float] = {}  # dpo: the reference forward's compile and run times
    frozen = reference_model if live else NO_FROZEN  # live: the update computes the reference log-probs
    if objective == "dpo":
        ref_forward = jax.jit(lambda f, b: reference_logps(f.models()["reference"], b))
        start = time.perf_counter()
        ref_compiled = ref_forward.lower(reference_model, device_batch).compile()
        reference_times["reference_compile_s"] = time.perf_counter() - start
        ref_times, _, _ = _timed_steps(lambda: ref_compiled(reference_model, device_batch), repeats)
        reference_times["reference_s"] = statistics.median(ref_times)
        if not live:  # one pass up front: the batch carries them into every step
            device_batch = {**device_batch, "ref_logps": ref_compiled(reference_model, device_batch)}
        del ref_compiled
    compiled = compile_update(update, state, device_batch, rng, mesh, frozen)

    def run():
        nonlocal state
        state, metrics = compiled(state, device_batch, rng, frozen)
        return metrics

    load = _OtherLoad().start()
    times, first, metrics = _timed_steps(run, repeats)
    other_cores = load.cores()
    step_s = statistics.median(times)
    devices = jax.devices()
    peak = matmul_flops_per_s(jnp.dtype(dtype)) * len(devices)
    forward = forward_flops(model_cfg, rows, length)
    if objective == "rm":  # a one-column score head instead of the vocabulary-wide LM head
        forward -= 2 * rows * length * model_cfg.hidden_size * (model_cfg.vocab_size - 1)
    flops = (4 if live else 3) * forward
    # A pair counts as its two sequences prompt + completion, as the TRL peer reads them.
    tokens = 2 * batch * (prompt_len + completion_len) if pairs else rows * length
    result = {"objective": objective, "model": spec, "family": model_cfg.family, "batch": batch}
    if pairs:
        result.update(prompt_len=prompt_len, completion_len=completion_len)
    else:
        result["seq_len"] = seq_len
    if objective == "dpo":
        result["reference"] = reference
    result.update(
        {
            "grad_accum_steps": accum_steps,
            "remat": remat,
            "dtype": dtype,
            "param_dtype": param_dtype,
            "device": devices[0].device_kind,
            "devices": len(devices),
            "compile_s": compiled.compile_s,
            "step_s": step_s,
            **reference_times,
            "tokens_per_step": tokens,
            "tokens_per_s": tokens / step_s,
            "flops_per_s": flops / step_s,
            "peak_matmul_flops_per_s": peak,
            "peak_fraction": flops / step_s / peak,
            "temp_bytes_per_device": compiled.memory.get("temp_size_in_bytes", 0),
            "first_loss": float(first["loss"]),
            "loss": float(metrics["loss"]),
            "other_load_cores": other_cores,
        }
    )
    if compare_trl:
        from . import peer as peers

        del state, compiled, update, device_batch, frozen, reference_model  # freed before the peer runs
        load = _OtherLoad().start()
        try:
            if objective == "sft":
                out = peers.trl_sft(
                    peer_dir.name, host_batch["tokens"], dtype=dtype, param_dtype=param_dtype, repeats=repeats
                )
            elif objective == "dpo":
                out = peers.trl_dpo(
                    peer_dir.name,
                    sides,
                    prompt_len,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    repeats=repeats,
                    beta=DPO_BETA,
                    reference=reference,
                )
            else:
                out = peers.trl_rm(
                    peer_dir.name, sides, dtype=dtype, param_dtype=param_dtype, repeats=repeats
                )
        finally:
            peer_dir.cleanup()
        out["peer_other_load_cores"] = load.cores()
        result.update(out, speedup=result["tokens_per_s"] / out["peer_tokens_per_s"])
    return result
