"""The held-out evaluation of RL runs: ``evaluator`` answers the held-out prompts greedily (one compiled
generation per batch of prompts) and scores them with the configured rewards: ``eval/reward/<name>`` per
component and ``eval/exact_match`` (the first ``math_verify`` or ``answer_match`` component's mean). Every
process scores every answer, so the metrics agree everywhere."""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxrl_llm.parallel import abstract, padded_rows, rows_shardings, to_host, tree_shardings
from jaxrl_llm.rollout import SamplingParams, generate

from .rl_data import PromptTable, on_mesh
from .rl_iteration import RLIteration
from .rl_step import sample_arrays
from .step import compile_program

VERIFIERS = ("math_verify", "answer_match")  # rewards whose mean is eval/exact_match


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
    batch = min(iteration_.prompts * cfg.group_size, padded_rows(len(table), it.mesh))  # padded by repeats
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
            host = to_host(out)  # every process scores every answer: the metrics agree everywhere
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
