"""The RL iteration a loop step runs (stages grpo and ppo).

``RLIteration`` draws the iteration's prompts (``rl_data``), then either runs one compiled program (every
reward a device reward: ``rl_step.iteration``, sampling, scoring, advantages and the updates with no host
round trip) or two: the rollout, the decoded completions scored on the host by the ``RewardSet``, and the
stage's ``learn`` (one device -> host -> device trip an iteration; with dynamic sampling one per round),
timed as ``time/rollout_s``, ``time/reward_s`` and ``time/update_s``. What a stage adds is its ``learn``
(GRPO's group advantages, PPO's critic and GAE) and where the policy sits in the trained parameters.

``rollout.mesh`` gives the rollouts a mesh of their own: each iteration reshards the policy's weights from
the training layout to the rollout layout (``time/reshard_s``; with LoRA only the adapters, the frozen base
placed there once) before the rollout program runs there; the samples come back through the host like host
rewards' (so the iteration is never the fused program). ``rl.reference_mesh`` does the same for the
reference model: its weights live only there, and a program there computes its log-probs of the scored
samples, which go to the training mesh with them (``time/reference_s``). With
``rollout.off_policy`` the next iteration's rollout is dispatched with the weights before this iteration's
update and runs on its mesh while the update runs on the training mesh: every update learns from samples one
update stale (the first two batches both come from the initial weights), corrected by ``rl.rollout_is``. A
rollout in flight is not checkpointed: a resumed run draws its next batch afresh, on-policy.

With several processes every one draws the same prompts, fetches the whole rollout and scores every
completion, so the host rewards (and their metrics) agree everywhere; the arrays on the mesh hold each
process's rows on its devices. ``on_log`` writes histograms of the last iteration's rewards (``rl/reward``, ``rl/reward/<component>``),
advantages (``rl/advantage``) and completion lengths (``rl/completion_length``), and a few of its
completions to TensorBoard (text) and ``<run_dir>/samples.jsonl``; the iteration's per-sample arrays stay
on the device (``IterationLog``) until a log step fetches them. The held-out evaluation of RL runs is
``rl_eval``'s.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxrl_llm.models.lora import ADAPTER_STATE
from jaxrl_llm.parallel import abstract, is_main_process, put, rows_shardings, to_host, tree_shardings
from jaxrl_llm.reward import RewardSet
from jaxrl_llm.rollout import FINISH_REASONS, SamplingParams, completion_text

from .loop import log
from .rl_data import Prompts, PromptTable, on_mesh, prompt_batches
from .rl_groups import Sampled, Scores, filling_metrics, mark_unfilled, refill
from .rl_step import IterationLog, RLConfig, iteration, reference_logps, rollout, sample_arrays
from .step import compile_program

LearnFn = Callable[..., tuple[Any, dict[str, jax.Array], jax.Array]]  # (state, frozen, sampled, key)


@dataclasses.dataclass(frozen=True)
class _Launched:
    """A dispatched rollout: its prompts' records, the rollout arrays (maybe still being computed) and the
    seconds the policy's weights took to reach the rollout mesh (counted in the iteration that sent them)."""

    index: np.ndarray
    rollout: Any
    reshard_s: float


@dataclasses.dataclass
class _Transfer:
    """Sends the policy's weights to the rollout mesh: ``self(policy)`` is the policy there. With LoRA only
    the adapters move each time; the frozen base goes once, at the first call, and is kept there."""

    shardings: Any  # the whole policy's shardings on the rollout mesh
    split: tuple[Any, Any] | None = None  # LoRA: the adapters' and the base's shardings
    base: Any = None  # LoRA: the base on the rollout mesh, after the first call

    @classmethod
    def of(cls, policy: Any, mesh: Any) -> _Transfer:
        shardings = tree_shardings(policy, mesh)
        lora = bool(jax.tree.leaves(nnx.filter_state(policy, ADAPTER_STATE)))
        return cls(shardings, nnx.split_state(shardings, ADAPTER_STATE, ...) if lora else None)

    def __call__(self, policy: Any) -> Any:
        if self.split is None:
            return put(policy, self.shardings)
        adapters, base = nnx.split_state(policy, ADAPTER_STATE, ...)
        if self.base is None:
            self.base = put(base, self.split[1])
        return nnx.merge_state(self.base, put(adapters, self.split[0]))


@dataclasses.dataclass(frozen=True)
class PolicyAccess:
    """Where an iteration finds the policy: its graph definition for rollouts (with the rollout's compute
    dtype) and ``of(params)``, the policy's parameters within the trained ones (all of them for GRPO, the
    ``policy`` half of PPO's actor-critic)."""

    graphdef: Any
    of: Callable[[Any], Any] = lambda params: params


@dataclasses.dataclass
class RLParts:
    """What an RL stage gives the iteration: its resolved settings, rewards, prompts, ``learn(state, frozen,
    sampled, key) -> (state, metrics, advantages)``, the policy's place, the frozen models (``reference``:
    the reference on a mesh of its own, None when it is among ``frozen`` or there is none) and the FLOPs of
    one iteration."""

    cfg: RLConfig
    rewards: RewardSet
    table: PromptTable
    learn: LearnFn
    policy: PolicyAccess
    frozen: Any
    flops: float
    reference: Any = None


_refill = jax.jit(refill, static_argnums=3)  # host-side dynamic sampling: the fused program's own refill


class RLIteration:
    """One RL iteration a loop step: the fused program, or rollout + host scoring + ``learn``.

    Args:
      parts: the stage's ``RLParts``.
      mesh: where everything runs.
      tokenizer: decodes completions for host rewards and logs.
      prompts: prompts a round (``rl.prompts_per_iteration``).
      sampling: the rollouts' ``SamplingParams``.
      seed: the prompt order's seed.
      log_samples: completions written at each log step; samples_path: where.
      rollout_mesh: the rollouts' own mesh (None: ``mesh``); off_policy: one-step off-policy rollouts on it.
      reference_mesh: the mesh ``parts.reference`` lives on (with it).
    """

    def __init__(
        self,
        parts: RLParts,
        mesh: Any,
        tokenizer: Any,
        *,
        prompts: int,
        sampling: SamplingParams,
        seed: int,
        log_samples: int,
        samples_path: Any,
        rollout_mesh: Any = None,
        off_policy: bool = False,
        reference_mesh: Any = None,
    ):
        self.parts, self.cfg, self.rewards, self.table = parts, parts.cfg, parts.rewards, parts.table
        self.mesh, self.frozen, self.tokenizer, self.prompts = mesh, parts.frozen, tokenizer, prompts
        self.rollout_mesh = mesh if rollout_mesh is None else rollout_mesh
        self.off_policy = off_policy
        if off_policy and self.rollout_mesh is mesh:
            raise ValueError("off_policy rollouts need a rollout_mesh of their own")
        self.data = iter(prompt_batches(len(self.table), prompts * self.cfg.rounds, seed))
        self.sampling = sampling.as_arrays()
        self.reference, self.reference_mesh = parts.reference, reference_mesh
        if (self.reference is None) != (reference_mesh is None):
            raise ValueError("a reference on a mesh of its own comes with that mesh")
        self.fused = (
            self.rollout_mesh is mesh
            and self.reference is None
            and all(s.reward.kind == "device" for s in self.rewards.specs)
        )
        self._to_rollout: Any = None  # what the rollout mesh receives each iteration, when it has its own
        self._pending: _Launched | None = None  # off-policy: the next iteration's rollout, in flight
        self.log_samples, self.samples_path, self.flops = log_samples, samples_path, parts.flops
        self._programs: dict[str, Any] = {}
        self._last: IterationLog | None = None

    # --------------------------------------------------------------------------------------- compile

    def _example(self, batches: int, mesh: Any = None) -> Prompts:
        return abstract(
            on_mesh(self.table.batch(np.arange(batches * self.prompts) % len(self.table)), mesh or self.mesh)
        )

    def compile(self, state) -> float:
        replicated = NamedSharding(self.mesh, PartitionSpec())
        key, cfg, mesh = jax.random.key(0), self.cfg, self.mesh
        state_sh, frozen_sh = tree_shardings(state, mesh), tree_shardings(self.frozen, mesh)
        if self.fused:  # every round's prompts in one batch
            prompts = self._example(cfg.rounds)
            fn = functools.partial(
                iteration,
                self.parts.learn,
                self.parts.policy.graphdef,
                self.parts.policy.of,
                cfg,
                self.rewards.device_components,
                {s.key: s.weight for s in self.rewards.specs},
            )
            out_log = rows_shardings(
                jax.eval_shape(fn, state, self.frozen, prompts, key, self.sampling)[2], mesh
            )
            self._programs["iteration"] = compile_program(
                fn,
                (state, self.frozen, prompts, key, self.sampling),
                (state_sh, frozen_sh, rows_shardings(prompts, mesh), replicated, replicated),
                (state_sh, replicated, out_log),
                mesh,
                donate_argnums=(0,),
            )
        else:
            where = self.rollout_mesh
            prompts = self._example(1, where)
            roll = functools.partial(rollout, self.parts.policy.graphdef, cfg=cfg)
            policy = self.parts.policy.of(state.params)
            policy_sh = self.parts.policy.of(state_sh.params)
            if where is not mesh:  # compiled for the weights as they will arrive there
                self._to_rollout = _Transfer.of(policy, where)
                policy_sh = self._to_rollout.shardings
                policy = jax.tree.map(
                    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), policy, policy_sh
                )
            rolled = jax.eval_shape(roll, policy, prompts, key, self.sampling)
            there = NamedSharding(where, PartitionSpec())
            self._programs["rollout"] = compile_program(
                roll,
                (policy, prompts, key, self.sampling),
                (policy_sh, rows_shardings(prompts, where), there, there),
                rows_shardings(rolled, where),
                where,
            )
            prompts = self._example(1)
            sampled = Sampled(prompts, rolled, self._score_spec(rolled.lengths.shape[0]))
            if self.reference is not None:
                sampled = sampled.replace(ref_logps=self._compile_reference(sampled))
            fn = self.parts.learn
            advantages = jax.ShapeDtypeStruct(rolled.lengths.shape, jnp.float32)
            self._programs["learn"] = compile_program(
                fn,
                (state, self.frozen, sampled, key),
                (state_sh, frozen_sh, rows_shardings(sampled, mesh), replicated),
                (state_sh, replicated, rows_shardings(advantages, mesh)),
                mesh,
                donate_argnums=(0,),
            )
        for name, program in self._programs.items():
            log(f"rl {name} program: {program.describe()}")
        return sum(p.compile_s for p in self._programs.values())

    def _compile_reference(self, sampled: Sampled) -> jax.ShapeDtypeStruct:
        """The reference's program on its mesh; returns the shape of its log-probs."""
        where, fn = self.reference_mesh, functools.partial(reference_logps, self.cfg)
        sampled = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), sampled)
        out = jax.eval_shape(fn, self.reference, sampled)
        self._programs["reference"] = compile_program(
            fn,
            (self.reference, sampled),
            (tree_shardings(self.reference, where), rows_shardings(sampled, where)),
            rows_shardings(out, where),
            where,
        )
        return out

    def _score_spec(self, rows: int) -> Scores:
        f32 = jax.ShapeDtypeStruct((rows,), jnp.float32)
        b = jax.ShapeDtypeStruct((rows,), jnp.bool_)
        keys = [s.key for s in self.rewards.specs]
        return Scores(f32, b, {k: f32 for k in keys}, {k: b for k in keys})

    # --------------------------------------------------------------------------------------- run

    def __call__(self, state, step: int, rng: jax.Array):
        index = next(self.data)  # cfg.rounds batches of prompts
        if self.fused:
            prompts = on_mesh(self.table.batch(index), self.mesh)
            state, metrics, self._last = self._programs["iteration"](
                state, self.frozen, prompts, rng, self.sampling
            )
            return state, {**metrics, "flops": self.flops}
        sample_key, learn_key = jax.random.split(rng)  # as the fused program splits it
        if self.off_policy:
            first = self._pending or self._launch(state, index, sample_key)  # launched now only at the start
            sent = first.reshard_s if self._pending is None else 0.0
            # The next batch's rollout, by the weights before this update, runs while the update does.
            self._pending = self._launch(state, next(self.data), jax.random.fold_in(sample_key, 1))
            host, host_metrics = self._sample(state, first.index, sample_key, launched=first)
            host_metrics["time/reshard_s"] += sent + self._pending.reshard_s
        else:
            host, host_metrics = self._sample(state, index, sample_key)
        sampled, reference_metrics = self._on_training_mesh(host)
        host_metrics |= reference_metrics
        start = time.perf_counter()
        state, metrics, advantages = self._programs["learn"](state, self.frozen, sampled, learn_key)
        jax.block_until_ready(advantages)
        host_metrics["time/update_s"] = time.perf_counter() - start
        self._last = IterationLog.of(sampled, advantages)
        return state, {**metrics, **host_metrics, "flops": self.flops}

    def _on_training_mesh(self, host: Sampled) -> tuple[Sampled, dict[str, float]]:
        """The scored batch on the training mesh, with the reference's log-probs when the reference has a
        mesh of its own (computed there and sent along: ``time/reference_s``)."""
        if self.reference is None:
            return put(host, rows_shardings(host, self.mesh)), {}
        start = time.perf_counter()
        there = put(host, rows_shardings(host, self.reference_mesh))
        host = host.replace(ref_logps=self._programs["reference"](self.reference, there))
        sampled = jax.block_until_ready(put(host, rows_shardings(host, self.mesh)))
        return sampled, {"time/reference_s": time.perf_counter() - start}

    def _launch(self, state, index: np.ndarray, key: jax.Array) -> _Launched:
        """Dispatches a rollout of the prompts ``index`` on the rollout mesh (the policy resharded there when
        it has its own) without waiting for it."""
        policy = self.parts.policy.of(state.params)
        reshard_s = 0.0
        if self._to_rollout is not None:
            start = time.perf_counter()
            policy = jax.block_until_ready(self._to_rollout(policy))
            reshard_s = time.perf_counter() - start
            key = put(key, NamedSharding(self.rollout_mesh, PartitionSpec()))  # was on training
        prompts = on_mesh(self.table.batch(index), self.rollout_mesh)
        return _Launched(index, self._programs["rollout"](policy, prompts, key, self.sampling), reshard_s)

    def _sample(
        self, state, index: np.ndarray, key: jax.Array, launched: _Launched | None = None
    ) -> tuple[Sampled, dict[str, float]]:
        """Rollout rounds scored on the host (one round, or dynamic sampling's refills) -> the batch (on the
        host), with the rounds' timing (the weights' transfers of the rounds launched here) and the host
        rewards' error counts. ``launched``: the first round, already dispatched (off-policy)."""
        cfg, p = self.cfg, self.prompts
        timing = {"time/rollout_s": 0.0, "time/reward_s": 0.0}
        sent = 0.0
        errors: dict[str, float] = {}
        buffer, filled, first, tokens = None, 0, None, 0
        for k in range(cfg.rounds):
            rows = index[k * p : (k + 1) * p]
            start = time.perf_counter()
            round_key = key if k == 0 else jax.random.fold_in(key, k)
            resharding = 0.0
            if k > 0 or launched is None:
                launched = self._launch(state, rows, round_key)
                resharding = launched.reshard_s
            host = to_host(launched.rollout)
            scoring = time.perf_counter()
            scores, errs = self._score(rows, host)
            timing["time/rollout_s"] += scoring - start - resharding
            sent += resharding
            timing["time/reward_s"] += time.perf_counter() - scoring
            tokens += int(host.lengths.sum())
            for name, count in errs.items():
                errors[name] = errors.get(name, 0.0) + count
            new = Sampled(self.table.batch(rows), host, scores)
            if not cfg.dynamic_sampling:
                buffer = new
                break
            if first is None:
                first = buffer = new
            buffer, filled = _refill(buffer, filled, new, cfg.group_size)
            if int(filled) == p:
                break
        extra = {}
        if cfg.dynamic_sampling:
            extra = jax.device_get(filling_metrics(first, filled, k + 1, cfg.group_size))
            buffer = mark_unfilled(buffer, filled, cfg.group_size)
        timing["time/rollout_tokens_per_s"] = tokens / max(timing["time/rollout_s"], 1e-9)
        if self._to_rollout is not None:
            timing["time/reshard_s"] = sent
        return buffer, {**timing, **errors, **extra}

    def _score(self, index: np.ndarray, host: Any) -> tuple[Scores, dict[str, float]]:
        """Host scoring of decoded completions (``RewardSet``: host, model and device components)."""
        texts = self.texts(host)
        g = self.cfg.group_size
        records = [self.table.records[i] for i in index for _ in range(g)]
        prompts = self.table.batch(index)
        arrays = sample_arrays(jax.tree.map(np.asarray, prompts), host, g)
        result = self.rewards(texts, records, arrays)
        scores = Scores(
            total=result.total,
            valid=result.loss_mask,
            components=dict(result.components),
            applies=dict(result.applies),
        )
        errors = {f"reward/{k}/errors": float(v["count"]) for k, v in result.errors.items()}
        return scores, errors

    def texts(self, host: Any) -> list[str]:
        stops = [list(s) for s in self.cfg.stops]
        return [
            completion_text(
                self.tokenizer,
                np.asarray(host.tokens[r][: int(host.lengths[r])]).tolist(),
                FINISH_REASONS[int(host.finish_reason[r])],
                stops,
            )
            for r in range(len(host.lengths))
        ]

    # --------------------------------------------------------------------------------------- logging

    def on_log(self, step: int, writer: Any) -> None:
        """The last iteration's histograms, and a few of its completions as TensorBoard text and lines of
        ``samples.jsonl``: its only device -> host fetch of per-sample values, at log steps alone."""
        if self._last is None:
            return
        last = self._last if self.log_samples else self._last.replace(tokens=None)  # tokens: samples only
        last = to_host(last)  # a collective across processes: all fetch, process 0 writes
        if not is_main_process():
            return
        for tag, values in self.histograms(last).items():
            writer.write_histogram(step, tag, values)
        if self.log_samples:
            self._write_samples(step, writer, last)

    def histograms(self, last: IterationLog) -> dict[str, np.ndarray]:
        """Per-sample values of a fetched ``IterationLog`` over the samples their scalar metrics count:
        rewards where valid (components where they apply), advantages where the loss counts them, the
        lengths of every completion."""
        valid = np.asarray(last.valid, bool)
        counted = valid & (np.asarray(last.finish_reason) != 0) if self.cfg.mask_truncated else valid
        out = {"rl/reward": np.asarray(last.rewards)[valid]}
        for key, values in last.components.items():
            out[f"rl/reward/{key}"] = np.asarray(values)[np.asarray(last.applies[key], bool)]
        out["rl/advantage"] = np.asarray(last.advantages)[counted]
        out["rl/completion_length"] = np.asarray(last.lengths)
        return out

    def _write_samples(self, step: int, writer: Any, last: IterationLog) -> None:
        rows = range(min(self.log_samples, len(last.lengths)))
        texts = self.texts(last)
        g = self.cfg.group_size
        samples = []
        for r in rows:
            record = self.table.records[int(last.index[r // g])]
            prompt = record["prompt"][-1].get("content", "") if record.get("prompt") else ""
            samples.append(
                {
                    "step": step,
                    "prompt": prompt,
                    "completion": texts[r],
                    "reward": float(last.rewards[r]),
                    "advantage": float(last.advantages[r]),
                    "finish_reason": FINISH_REASONS[int(last.finish_reason[r])],
                    "ground_truth": record.get("ground_truth"),
                }
            )
        writer.write_samples(step, samples, self.samples_path)
