"""Stage ``grpo``: the GRPO family of online RL (GRPO, Dr.GRPO, DAPO, GSPO, RLOO, REINFORCE++, CISPO).

Each loop step is one RL iteration (``rl_step``): ``rl.prompts_per_iteration`` RL-prompt records, rendered
once into a ``PromptTable`` and drawn in shuffled batches whose position every checkpoint saves;
``rl.group_size`` completions each (``rollout.*``: max_new_tokens, temperature, top_p, top_k, min_p, stop
strings; optionally in another compute dtype, ``rollout.dtype``); rewards from ``reward.functions``;
advantages and ``rl.num_iterations`` epochs of ``rl.minibatches`` updates. ``rl.algorithm`` picks the
family member's settings (``objectives.rl.RL_ALGORITHMS``); each ``rl.*`` key left None takes it from there.

With only device rewards the iteration is one compiled program. With host rewards (``math_verify``, code
execution, a reward model) it is two, the rollout and the update, with the decoded completions scored on
the host in between: exactly one device -> host -> device trip an iteration, timed as ``time/rollout_s``,
``time/reward_s`` and ``time/update_s``.

Evaluation (``train.eval_every``, and before the first update): greedy answers to the held-out prompts
(``data.eval_split`` / ``data.eval_path``, at most ``rl.eval_prompts``), scored by the configured rewards:
``eval/reward/<name>`` per component and ``eval/exact_match`` (the first ``math_verify`` or
``answer_match`` component's mean). A few sampled completions are written at every log step to TensorBoard
(text) and ``<run_dir>/samples.jsonl``.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxrl_llm.errors import UserError
from jaxrl_llm.models.flops import forward_flops
from jaxrl_llm.objectives.rl import RL_ALGORITHMS, PolicyLossConfig
from jaxrl_llm.parallel import abstract, is_main_process, rows_shardings, tree_shardings
from jaxrl_llm.reward import RewardSet
from jaxrl_llm.rollout import FINISH_REASONS, SamplingParams, completion_text, end_of_turn_ids, generate

from .iteration import Plan, StageContext
from .loop import log
from .rl_data import Prompts, PromptTable, on_mesh, prompt_batches
from .rl_step import IterationLog, RLConfig, Scores, iteration, learn, rollout, sample_arrays
from .step import build_update, compile_program

VERIFIERS = ("math_verify", "answer_match")  # rewards whose mean is eval/exact_match


def resolved(cfg: Any, key: str) -> Any:
    """``rl.<key>``, or the ``rl.algorithm`` preset's value where it is None."""
    value = cfg.rl[key]
    return RL_ALGORITHMS[cfg.rl.algorithm][key] if value is None else value


def policy_config(cfg: Any) -> PolicyLossConfig:
    """The policy loss's settings (``rl.*``, presets resolved)."""
    return PolicyLossConfig(
        loss=resolved(cfg, "loss"),
        loss_agg=resolved(cfg, "loss_agg"),
        importance_level=resolved(cfg, "importance_level"),
        clip_low=float(resolved(cfg, "clip_low")),
        clip_high=float(resolved(cfg, "clip_high")),
        dual_clip=cfg.rl.dual_clip,
        beta=float(cfg.rl.beta),
        kl_estimator=cfg.rl.kl_estimator,
        rollout_is=cfg.rl.rollout_is,
        rollout_is_cap=float(cfg.rl.rollout_is_cap),
        max_completion_length=int(cfg.rollout.max_new_tokens),
    )


def rl_config(cfg: Any, renderer: Any) -> RLConfig:
    """The resolved ``RLConfig`` of a validated config (EOS ids and stop sequences from the renderer)."""
    stops = []
    for text in cfg.rollout.stop:
        ids = renderer.encode(text).tolist()
        if not ids:
            raise UserError(f"rollout.stop: {text!r} encodes to no tokens")
        stops.append(tuple(ids))
    pad = renderer.tokenizer.pad_id
    return RLConfig(
        group_size=int(cfg.rl.group_size),
        max_new_tokens=int(cfg.rollout.max_new_tokens),
        num_iterations=int(cfg.rl.num_iterations),
        minibatches=int(cfg.rl.minibatches),
        accum_steps=int(cfg.train.grad_accum_steps),
        baseline=resolved(cfg, "baseline"),
        scale=resolved(cfg, "scale"),
        advantage_eps=float(cfg.rl.advantage_eps),
        mask_truncated=bool(cfg.rl.mask_truncated),
        eos_ids=tuple(int(i) for i in end_of_turn_ids(renderer)),
        stops=tuple(stops),
        pad_id=0 if pad is None else int(pad),
        policy=policy_config(cfg),
    )


def reference_if_penalised(cfg: Any) -> tuple[str, ...]:
    """The frozen reference exists only for a KL penalty (``rl.beta > 0``)."""
    return ("reference",) if cfg.rl.beta > 0 else ()


def sampling_params(cfg: Any) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, min_p=r.min_p).validate()


def updates_per_step(cfg: Any) -> int:
    return int(cfg.rl.num_iterations) * int(cfg.rl.minibatches)


def check_mesh(cfg: Any, mesh: Any) -> None:
    """Rows the mesh cannot split evenly are a configuration error, named with the keys that set them."""
    split = data_split(mesh)
    p, g, m = (int(v) for v in (cfg.rl.prompts_per_iteration, cfg.rl.group_size, cfg.rl.minibatches))
    micro = p * g // m // int(cfg.train.grad_accum_steps)
    for what, rows in (
        ("rl.prompts_per_iteration", p),
        ("a micro-batch (prompts x group_size / rl.minibatches / train.grad_accum_steps)", micro),
    ):
        if rows % split:
            raise UserError(
                f"{what} = {rows} rows cannot be split over the mesh's {split} data-parallel devices "
                f"(parallel.data x parallel.fsdp); make it a multiple of {split}"
            )


def data_split(mesh: Any) -> int:
    """Devices a batch's rows are split over (the ``data`` and ``fsdp`` axes)."""
    return int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))


def rollout_graphdef(graphdef: Any, model: Any, dtype: str) -> Any:
    """The policy's graph definition with the rollout's compute dtype (parameters unchanged)."""
    if not dtype or dtype == model.cfg.dtype:
        return graphdef
    from flax import nnx

    from jaxrl_llm.models.create import abstract_model

    other = abstract_model(model.cfg.replace(dtype=dtype))
    return nnx.split(other, nnx.Param)[0]


class RLIteration:
    """One RL iteration a loop step: the fused program, or rollout + host scoring + update."""

    def __init__(self, ctx: StageContext, cfg: RLConfig, rewards: RewardSet, table: PromptTable):
        c, run = ctx.cfg, ctx.run
        self.cfg, self.rewards, self.table, self.mesh, self.frozen = cfg, rewards, table, run.mesh, ctx.frozen
        self.tokenizer = run.tokenizer
        self.prompts = int(c.rl.prompts_per_iteration)
        self.data = iter(prompt_batches(len(table), self.prompts, c.seed))
        self.sampling = sampling_params(c).as_arrays()
        self.fused = all(s.reward.kind == "device" for s in rewards.specs)
        self.log_samples = int(c.rl.log_samples)
        self.graphdef = ctx.graphdef
        self.rollout_graphdef = rollout_graphdef(ctx.graphdef, run.model, c.rollout.dtype)
        self.update = build_update(
            ctx.graphdef, ctx.objective, ctx.tx, ctx.schedule, accum_steps=cfg.accum_steps, mesh=run.mesh
        )
        rows, width = self.prompts * cfg.group_size, table.width + cfg.max_new_tokens
        arch = run.model.cfg
        passes = 3 * cfg.num_iterations + cfg.recompute_old + (cfg.policy.beta > 0)
        self.flops = (
            forward_flops(arch, self.prompts, table.width)
            + forward_flops(arch, rows, cfg.max_new_tokens)
            + passes * forward_flops(arch, rows, width)
        )
        self._programs: dict[str, Any] = {}
        self._last: IterationLog | None = None
        self.samples_path = run.run_dir / "samples.jsonl"

    # --------------------------------------------------------------------------------------- compile

    def _example(self) -> Prompts:
        return abstract(on_mesh(self.table.batch(np.arange(self.prompts)), self.mesh))

    def compile(self, state) -> float:
        replicated = NamedSharding(self.mesh, PartitionSpec())
        prompts, key = self._example(), jax.random.key(0)
        state_sh, frozen_sh = tree_shardings(state, self.mesh), tree_shardings(self.frozen, self.mesh)
        prompts_sh = rows_shardings(prompts, self.mesh)
        cfg = self.cfg
        if self.fused:
            fn = functools.partial(
                iteration,
                self.update,
                self.graphdef,
                self.rollout_graphdef,
                cfg,
                self.rewards.device_components,
                {s.key: s.weight for s in self.rewards.specs},
            )
            out_log = rows_shardings(
                jax.eval_shape(fn, state, self.frozen, prompts, key, self.sampling)[2], self.mesh
            )
            self._programs["iteration"] = compile_program(
                fn,
                (state, self.frozen, prompts, key, self.sampling),
                (state_sh, frozen_sh, prompts_sh, replicated, replicated),
                (state_sh, replicated, out_log),
                self.mesh,
                donate_argnums=(0,),
            )
        else:
            roll = functools.partial(rollout, self.rollout_graphdef, cfg=cfg)
            rolled = jax.eval_shape(roll, state.params, prompts, key, self.sampling)
            rolled_sh = rows_shardings(rolled, self.mesh)
            self._programs["rollout"] = compile_program(
                roll,
                (state.params, prompts, key, self.sampling),
                (state_sh.params, prompts_sh, replicated, replicated),
                rolled_sh,
                self.mesh,
            )
            scores = self._score_spec(rolled.lengths.shape[0])
            fn = functools.partial(learn, self.update, self.graphdef, cfg)
            self._programs["learn"] = compile_program(
                fn,
                (state, self.frozen, prompts, rolled, scores, key),
                (state_sh, frozen_sh, prompts_sh, rolled_sh, rows_shardings(scores, self.mesh), replicated),
                (
                    state_sh,
                    replicated,
                    rows_shardings(jax.ShapeDtypeStruct((rolled.lengths.shape[0],), jnp.float32), self.mesh),
                ),
                self.mesh,
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
        index = next(self.data)
        prompts = on_mesh(self.table.batch(index), self.mesh)
        if self.fused:
            state, metrics, self._last = self._programs["iteration"](
                state, self.frozen, prompts, rng, self.sampling
            )
            return state, {**metrics, "flops": self.flops}
        sample_key, learn_key = jax.random.split(rng)  # as the fused program splits it
        start = time.perf_counter()
        rolled = self._programs["rollout"](state.params, prompts, sample_key, self.sampling)
        host = jax.device_get(rolled)
        scored = time.perf_counter()
        scores, host_metrics = self._score(index, host)
        learning = time.perf_counter()
        scores = jax.device_put(scores, rows_shardings(scores, self.mesh))
        state, metrics, advantages = self._programs["learn"](
            state, self.frozen, prompts, rolled, scores, learn_key
        )
        jax.block_until_ready(advantages)
        done = time.perf_counter()
        self._last = IterationLog(
            prompts.index, rolled.tokens, rolled.lengths, rolled.finish_reason, scores.total, advantages
        )
        timing = {
            "time/rollout_s": scored - start,
            "time/reward_s": learning - scored,
            "time/update_s": done - learning,
            "time/rollout_tokens_per_s": float(host.lengths.sum()) / max(scored - start, 1e-9),
        }
        return state, {**metrics, **host_metrics, **timing, "flops": self.flops}

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
        """A few of the last iteration's completions, as TensorBoard text and lines of ``samples.jsonl``."""
        if self._last is None or not self.log_samples or not is_main_process():
            return
        last = jax.device_get(self._last)
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


def _eval_program(ctx: StageContext, cfg: RLConfig, table: PromptTable, batch: int, params: Any):
    """Greedy answers to ``batch`` held-out prompts at a time: one compiled generation."""
    mesh = ctx.run.mesh
    replicated = NamedSharding(mesh, PartitionSpec())
    fn = functools.partial(
        generate,
        ctx.graphdef,
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


def evaluator(ctx: StageContext, cfg: RLConfig, rewards: RewardSet, iteration_: RLIteration):
    """``eval(state, step)``: greedy answers to the held-out prompts, scored by every reward component."""
    c, run = ctx.cfg, ctx.run
    records = run.eval_records[: c.rl.eval_prompts] if c.rl.eval_prompts else run.eval_records
    table = PromptTable(records, run.renderer, pad_id=cfg.pad_id, what="evaluation prompts")
    split = data_split(run.mesh)
    batch = min(iteration_.prompts * cfg.group_size, -(-len(table) // split) * split)  # padded by repeats
    compiled: dict[str, Any] = {}
    verifier = next((s.key for s in rewards.specs if s.name in VERIFIERS), None)

    def evaluate(state, step: int) -> dict[str, float]:
        if "program" not in compiled:
            compiled["program"], compiled["sampling"] = _eval_program(ctx, cfg, table, batch, state.params)
        values: dict[str, list[float]] = {}
        totals: list[float] = []
        for start in range(0, len(table), batch):
            index = np.arange(start, start + batch) % len(table)
            real = min(batch, len(table) - start)
            prompts = on_mesh(table.batch(index), run.mesh)
            out = compiled["program"](
                state.params, prompts.ids, prompts.mask, jax.random.key(0), compiled["sampling"]
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


def grpo_plan(ctx: StageContext) -> Plan:
    c, run = ctx.cfg, ctx.run
    if jax.process_count() > 1:
        raise UserError(
            "stage='grpo' runs in one process for now (multi-host RL arrives with the scale-out issue)"
        )
    check_mesh(c, run.mesh)
    cfg = rl_config(c, run.renderer)
    table = PromptTable(run.train_records, run.renderer, pad_id=cfg.pad_id, what="data.path")
    limit = run.model.cfg.max_seq_len
    if table.width + cfg.max_new_tokens > limit:
        raise UserError(
            f"prompts of up to {table.longest} tokens (padded to {table.width}) + rollout.max_new_tokens="
            f"{cfg.max_new_tokens} exceed the model's max_seq_len {limit}: lower rollout.max_new_tokens or drop "
            "long prompts with data.max_tokens"
        )
    rewards = RewardSet.from_config(c, tokenizer=run.tokenizer)
    it = RLIteration(ctx, cfg, rewards, table)
    log(
        f"rl: {c.rl.algorithm} ({cfg.baseline} baseline, {cfg.scale} scale, {cfg.policy.loss_agg}), "
        f"{it.prompts} prompts x {cfg.group_size} samples an iteration, {cfg.updates} update(s); "
        f"{'one compiled program (device rewards)' if it.fused else 'rollout and update programs, host rewards between'}"
    )
    evaluators = [evaluator(ctx, cfg, rewards, it)] if run.eval_records else []
    signature = {
        "rl.prompts_per_iteration": it.prompts,
        "rl.group_size": cfg.group_size,
        "seed": c.seed,
        "processes": jax.process_count(),
        "training data (content hash)": run.loaded.content_hash,
    }

    def report(summary: dict[str, Any]) -> dict[str, Any]:
        final, first = summary["final_eval"], summary["first_eval"]
        train = summary["final_train"]
        shown = {
            k: train[k] for k in ("reward/total/mean", "loss", "kl", "completion/length_mean") if k in train
        }
        log(
            f"done: {summary['steps']} iterations; "
            + ", ".join(f"{k} {v:.4g}" for k, v in shown.items())
            + f"; summary in {run.run_dir / 'summary.json'}"
        )
        extra = {}
        if "exact_match" in final:
            extra = {
                "eval/exact_match": final["exact_match"],
                "eval/exact_match_start": first.get("exact_match"),
            }
            log(
                f"held-out greedy exact match: {final['exact_match']:.1%} of {final['samples']:.0f} prompts "
                f"(before training: {first.get('exact_match', float('nan')):.1%})"
            )
        return extra

    return Plan(it, signature, evaluators, report, eval_at_start=True)
