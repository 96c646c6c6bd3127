"""The RL iteration a loop step runs (stages grpo and ppo), and the held-out evaluation of RL runs.

``RLIteration`` draws the iteration's prompts (``rl_data``), then either runs one compiled program (every
reward a device reward: ``rl_step.iteration``, sampling, scoring, advantages and the updates with no host
round trip) or two: the rollout, the decoded completions scored on the host by the ``RewardSet``, and the
stage's ``learn`` (one device -> host -> device trip an iteration; with dynamic sampling one per round),
timed as ``time/rollout_s``, ``time/reward_s`` and ``time/update_s``. What a stage adds is its ``learn``
(GRPO's group advantages, PPO's critic and GAE) and where the policy sits in the trained parameters.

``on_log`` writes histograms of the last iteration's rewards (``rl/reward``, ``rl/reward/<component>``),
advantages (``rl/advantage``) and completion lengths (``rl/completion_length``), and a few of its
completions to TensorBoard (text) and ``<run_dir>/samples.jsonl``; the iteration's per-sample arrays stay
on the device (``IterationLog``) until a log step fetches them. ``evaluator`` answers the held-out prompts
greedily and scores them with the configured rewards: ``eval/reward/<name>`` per component and
``eval/exact_match`` (the first ``math_verify`` or ``answer_match`` component's mean).
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
from jax.sharding import NamedSharding, PartitionSpec

from jaxrl_llm.parallel import abstract, is_main_process, rows_shardings, tree_shardings
from jaxrl_llm.reward import RewardSet
from jaxrl_llm.rollout import FINISH_REASONS, SamplingParams, completion_text, generate

from .loop import log
from .rl_data import Prompts, PromptTable, on_mesh, prompt_batches
from .rl_groups import Sampled, Scores, filling_metrics, mark_unfilled, refill
from .rl_step import IterationLog, RLConfig, iteration, rollout, sample_arrays
from .step import compile_program

VERIFIERS = ("math_verify", "answer_match")  # rewards whose mean is eval/exact_match
LearnFn = Callable[..., tuple[Any, dict[str, jax.Array], jax.Array]]  # (state, frozen, sampled, key)


def data_split(mesh: Any) -> int:
    """Devices a batch's rows are split over (the ``data`` and ``fsdp`` axes)."""
    return int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))


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
    sampled, key) -> (state, metrics, advantages)``, the policy's place, the frozen models and the FLOPs of
    one iteration."""

    cfg: RLConfig
    rewards: RewardSet
    table: PromptTable
    learn: LearnFn
    policy: PolicyAccess
    frozen: Any
    flops: float


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
    ):
        self.parts, self.cfg, self.rewards, self.table = parts, parts.cfg, parts.rewards, parts.table
        self.mesh, self.frozen, self.tokenizer, self.prompts = mesh, parts.frozen, tokenizer, prompts
        self.data = iter(prompt_batches(len(self.table), prompts * self.cfg.rounds, seed))
        self.sampling = sampling.as_arrays()
        self.fused = all(s.reward.kind == "device" for s in self.rewards.specs)
        self.log_samples, self.samples_path, self.flops = log_samples, samples_path, parts.flops
        self._programs: dict[str, Any] = {}
        self._last: IterationLog | None = None

    # --------------------------------------------------------------------------------------- compile

    def _example(self, batches: int) -> Prompts:
        return abstract(
            on_mesh(self.table.batch(np.arange(batches * self.prompts) % len(self.table)), self.mesh)
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
            prompts = self._example(1)
            roll = functools.partial(rollout, self.parts.policy.graphdef, cfg=cfg)
            policy = self.parts.policy.of(state.params)
            rolled = jax.eval_shape(roll, policy, prompts, key, self.sampling)
            self._programs["rollout"] = compile_program(
                roll,
                (policy, prompts, key, self.sampling),
                (
                    self.parts.policy.of(state_sh.params),
                    rows_shardings(prompts, mesh),
                    replicated,
                    replicated,
                ),
                rows_shardings(rolled, mesh),
                mesh,
            )
            sampled = Sampled(prompts, rolled, self._score_spec(rolled.lengths.shape[0]))
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
        sampled, host_metrics = self._sample(state, index, sample_key)
        start = time.perf_counter()
        state, metrics, advantages = self._programs["learn"](state, self.frozen, sampled, learn_key)
        jax.block_until_ready(advantages)
        host_metrics["time/update_s"] = time.perf_counter() - start
        self._last = IterationLog.of(sampled, advantages)
        return state, {**metrics, **host_metrics, "flops": self.flops}

    def _sample(self, state, index: np.ndarray, key: jax.Array) -> tuple[Sampled, dict[str, float]]:
        """Rollout rounds scored on the host (one round, or dynamic sampling's refills) -> the batch on the
        mesh, with the rounds' timing and the host rewards' error counts."""
        cfg, p = self.cfg, self.prompts
        timing = {"time/rollout_s": 0.0, "time/reward_s": 0.0}
        errors: dict[str, float] = {}
        buffer, filled, first, tokens = None, 0, None, 0
        for k in range(cfg.rounds):
            rows = index[k * p : (k + 1) * p]
            start = time.perf_counter()
            prompts = on_mesh(self.table.batch(rows), self.mesh)
            round_key = key if k == 0 else jax.random.fold_in(key, k)
            policy = self.parts.policy.of(state.params)
            host = jax.device_get(self._programs["rollout"](policy, prompts, round_key, self.sampling))
            scoring = time.perf_counter()
            scores, errs = self._score(rows, host)
            timing["time/rollout_s"] += scoring - start
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
        sampled = jax.device_put(buffer, rows_shardings(buffer, self.mesh))
        return sampled, {**timing, **errors, **extra}

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
        if self._last is None or not is_main_process():
            return
        last = self._last if self.log_samples else self._last.replace(tokens=None)  # tokens: samples only
        last = jax.device_get(last)
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


def _eval_program(it: RLIteration, table: PromptTable, batch: int, params: Any):
    """Greedy answers to ``batch`` held-out prompts at a time: one compiled generation."""
    mesh, cfg = it.mesh, it.cfg
    replicated = NamedSharding(mesh, PartitionSpec())
    fn = functools.partial(
        generate,
        it.parts.policy.graphdef,
        n=1,
        max_new_tokens=cfg.max_new_tokens,
        eos_ids=cfg.eos_ids,
        stops=cfg.stops,
        pad_id=cfg.pad_id,
    )
    example = on_mesh(table.batch(np.arange(batch) % len(table)), mesh)
    params = abstract(params)
    sampling = SamplingParams.greedy().as_arrays()
    args = (params, example.ids, example.mask, jax.random.key(0), sampling)
    out = jax.eval_shape(fn, *args)
    rows = rows_shardings(example.ids, mesh)
    return compile_program(
        fn,
        args,
        (tree_shardings(params, mesh), rows, rows, replicated, replicated),
        rows_shardings(out, mesh),
        mesh,
    ), sampling


def evaluator(it: RLIteration, records: list[dict], renderer: Any):
    """``eval(state, step)``: greedy answers to the held-out ``records``, scored by every reward component."""
    cfg, rewards, iteration_ = it.cfg, it.rewards, it
    table = PromptTable(records, renderer, pad_id=cfg.pad_id, what="evaluation prompts")
    split = data_split(it.mesh)
    batch = min(iteration_.prompts * cfg.group_size, -(-len(table) // split) * split)  # padded by repeats
    compiled: dict[str, Any] = {}
    verifier = next((s.key for s in rewards.specs if s.name in VERIFIERS), None)

    def evaluate(state, step: int) -> dict[str, float]:
        if "program" not in compiled:
            compiled["program"], compiled["sampling"] = _eval_program(
                it, table, batch, it.parts.policy.of(state.params)
            )
        values: dict[str, list[float]] = {}
        totals: list[float] = []
        for start in range(0, len(table), batch):
            index = np.arange(start, start + batch) % len(table)
            real = min(batch, len(table) - start)
            prompts = on_mesh(table.batch(index), it.mesh)
            policy = it.parts.policy.of(state.params)
            out = compiled["program"](
                policy, prompts.ids, prompts.mask, jax.random.key(0), compiled["sampling"]
            )
            host = jax.device_get(out)
            texts = iteration_.texts(host)[:real]
            recs = [table.records[i] for i in index[:real]]
            arrays = sample_arrays(
                jax.tree.map(np.asarray, table.batch(index[:real])),
                jax.tree.map(lambda x, real=real: x[:real], host),
                1,
            )
            result = rewards(texts, recs, arrays)
            totals += result.total.tolist()
            for key, v in result.components.items():
                values.setdefault(key, []).extend(v[result.applies[key]].tolist())
        metrics = {f"reward/{k}": float(np.mean(v)) if v else 0.0 for k, v in values.items()}
        metrics["reward/total"] = float(np.mean(totals))
        if verifier is not None:
            metrics["exact_match"] = metrics[f"reward/{verifier}"]
        metrics["samples"] = float(len(table))
        return metrics

    return evaluate
