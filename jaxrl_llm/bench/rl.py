"""GRPO iteration throughput: seconds per iteration, split into rollout and update, and the peer's.

The iteration is the one stage ``grpo`` compiles when every reward is a device reward
(``train.rl_step.iteration``: rollout, rewards, group advantages and the update in one program), on
``prompts`` random prompts of ``prompt_len`` tokens, ``group`` completions each. As the issue specifies:
beta = 0 (no reference), mu = 1 and one minibatch (one optimizer update an iteration, AdamW), and every
completion forced to the full ``new_tokens`` (no end-of-sequence id), so both sides do the same work. The
reward is a device function of the completion's tokens (their sum modulo 7, over 7): it varies within
groups, so the advantages and the update are real.

``iteration_s`` times the fused program; ``rollout_s`` and ``update_s`` time the rollout alone and the
learning step alone (advantages and the update on a fixed rollout), each its own compiled program (their
sum exceeds ``iteration_s`` by the second program launch). Tokens: ``prompts * group * new_tokens``
generated per iteration (``rollout_tokens_per_s``), and ``prompts * group * (prompt_len + new_tokens)``
trained on (``update_tokens_per_s``). ``peak_fraction``: the iteration's matmul FLOPs (prefill, decode, and
3 forwards of the update) over this machine's measured peak. ``rollout_dtype`` runs the rollouts in another
compute dtype (bf16 rollouts with fp32 updates), which is what rollout correction is for.

With ``compare_trl``, TRL's ``GRPOTrainer`` runs the same weights and prompt ids (``peer.trl_grpo``);
``speedup`` is its seconds per iteration over ours.
"""

from __future__ import annotations

import functools
import statistics
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from ..observe.peak import matmul_flops_per_s

DEFAULT_PROMPTS = DEFAULT_GROUP = 4
DEFAULT_NEW_TOKENS = 64


def _token_hash(arrays) -> dict[str, jax.Array]:
    """A deterministic reward that differs between completions: (sum of the completion's ids mod 7) / 7."""
    ids = jnp.where(arrays.completion_mask, arrays.completion_ids, 0)
    return {"token_hash": (ids.sum(axis=-1) % 7).astype(jnp.float32) / 7.0}


def bench_grpo(
    spec: str,
    *,
    prompts: int = DEFAULT_PROMPTS,
    group: int = DEFAULT_GROUP,
    prompt_len: int = 64,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    dtype: str = "float32",
    param_dtype: str = "float32",
    rollout_dtype: str | None = None,
    repeats: int = 3,
    compare_trl: bool = False,
) -> dict:
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from ..models import save_hf
    from ..objectives import PolicyLossConfig, policy_objective
    from ..parallel import make_mesh, place, rows_shardings, tree_shardings
    from ..rollout import SamplingParams
    from ..train.grpo import iteration_flops, rollout_graphdef
    from ..train.optimizer import OptimizerConfig, make_optimizer, make_schedule
    from ..train.rl_data import Prompts
    from ..train.rl_groups import Sampled
    from ..train.rl_step import RLConfig, device_scores, iteration, learn, rollout
    from ..train.state import TrainState
    from ..train.step import NO_FROZEN, build_update, compile_program
    from .train import _OtherLoad, _timed_steps, _train_model

    mesh = make_mesh()
    model = _train_model(spec, param_dtype, dtype)
    arch = model.cfg
    if compare_trl:  # the update donates the model's arrays: export the peer's copy first
        peer_dir = tempfile.TemporaryDirectory()
        save_hf(model, peer_dir.name)
    rs = np.random.RandomState(0)
    ids = rs.randint(1, arch.vocab_size, (prompts, prompt_len)).astype(np.int32)
    host_prompts = Prompts(
        ids=ids,
        mask=np.ones_like(ids),
        answer_ids=np.zeros((prompts, 1), np.int32),
        answer_mask=np.zeros((prompts, 1), bool),
        index=np.arange(prompts, dtype=np.int32),
    )
    batch = jax.device_put(host_prompts, rows_shardings(host_prompts, mesh))
    # TRL's default loss is DAPO's token mean; mu = 1, one update, no reference.
    cfg = RLConfig(
        group_size=group, max_new_tokens=new_tokens, policy=PolicyLossConfig(loss_agg="token_mean")
    )
    opt = OptimizerConfig(warmup_steps=0, schedule="constant")
    tx = make_optimizer(opt, nnx.state(model, nnx.Param))
    graphdef, state = TrainState.create(model, tx, jax.random.key(0))
    state = place(state, mesh)
    roll_graphdef = rollout_graphdef(graphdef, model, rollout_dtype or dtype)
    del model
    update = build_update(graphdef, policy_objective(cfg.policy), tx, make_schedule(opt))
    learn_fn = functools.partial(learn, update, graphdef, cfg)
    sampling = SamplingParams().as_arrays()
    key = jax.random.key(1)
    rep = NamedSharding(mesh, PartitionSpec())
    state_sh = tree_shardings(state, mesh)
    fused_fn = functools.partial(
        iteration, learn_fn, roll_graphdef, lambda p: p, cfg, _token_hash, {"token_hash": 1.0}
    )
    out = jax.eval_shape(fused_fn, state, NO_FROZEN, batch, key, sampling)
    fused = compile_program(
        fused_fn,
        (state, NO_FROZEN, batch, key, sampling),
        (state_sh, tree_shardings(NO_FROZEN, mesh), rows_shardings(batch, mesh), rep, rep),
        (state_sh, rep, rows_shardings(out[2], mesh)),
        mesh,
        donate_argnums=(0,),
    )
    roll_fn = functools.partial(rollout, roll_graphdef, cfg=cfg)
    rolled_spec = jax.eval_shape(roll_fn, state.params, batch, key, sampling)
    roll = compile_program(
        roll_fn,
        (state.params, batch, key, sampling),
        (state_sh.params, rows_shardings(batch, mesh), rep, rep),
        rows_shardings(rolled_spec, mesh),
        mesh,
    )

    def fused_run():
        nonlocal state
        state, metrics, _ = fused(state, NO_FROZEN, batch, key, sampling)
        return metrics

    load = _OtherLoad().start()
    times, first, last = _timed_steps(fused_run, repeats)
    rollout_times, _, rolled = _timed_steps(lambda: roll(state.params, batch, key, sampling), repeats)
    sampled = Sampled(batch, rolled, device_scores(_token_hash, {"token_hash": 1.0}, batch, rolled, group))
    learn_compiled = compile_program(
        learn_fn,
        (state, NO_FROZEN, sampled, key),
        (state_sh, tree_shardings(NO_FROZEN, mesh), rows_shardings(sampled, mesh), rep),
        (state_sh, rep, rows_shardings(rolled.lengths, mesh)),
        mesh,
        donate_argnums=(0,),
    )

    def learn_run():
        nonlocal state
        state, metrics, _ = learn_compiled(state, NO_FROZEN, sampled, key)
        return metrics

    update_times, _, _ = _timed_steps(learn_run, repeats)
    other_cores = load.cores()
    iteration_s, rollout_s, update_s = map(statistics.median, (times, rollout_times, update_times))
    flops = iteration_flops(arch, prompts, prompt_len, cfg, passes=3)
    peak = matmul_flops_per_s(jnp.dtype(dtype)) * len(jax.devices())
    generated = prompts * group * new_tokens
    result = {
        "objective": "grpo",
        "model": spec,
        "family": arch.family,
        "prompts": prompts,
        "group": group,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "dtype": dtype,
        "param_dtype": param_dtype,
        "rollout_dtype": rollout_dtype or dtype,
        "device": jax.devices()[0].device_kind,
        "devices": len(jax.devices()),
        "compile_s": fused.compile_s,
        "iteration_s": iteration_s,
        "rollout_s": rollout_s,
        "update_s": update_s,
        "rollout_tokens_per_s": generated / rollout_s,
        "update_tokens_per_s": prompts * group * (prompt_len + new_tokens) / update_s,
        "peak_matmul_flops_per_s": peak,
        "peak_fraction": flops / iteration_s / peak,
        "completion_tokens": float(first["completion/tokens"]),
        "first_loss": float(first["loss"]),
        "loss": float(last["loss"]),
        "other_load_cores": other_cores,
    }
    if compare_trl:
        from . import peer as peers

        del state, fused, roll, learn_compiled, sampled, batch  # freed before the peer runs
        load = _OtherLoad().start()
        try:
            out = peers.trl_grpo(
                peer_dir.name,
                ids,
                group=group,
                new_tokens=new_tokens,
                dtype=dtype,
                param_dtype=param_dtype,
                repeats=repeats,
            )
        finally:
            peer_dir.cleanup()
        out["peer_other_load_cores"] = load.cores()
        result.update(out, speedup=out["peer_iteration_s"] / iteration_s)
    return result
