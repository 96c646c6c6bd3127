"""Named evaluation sets (``eval.sets``), evaluated in training every ``train.eval_every`` steps.

``eval.sets`` is a list of ``{"name", "path", ...}`` entries (on the command line a JSON list):

- ``name`` (required): the set's metrics are logged as ``eval/<name>/<metric>``;
- ``path`` (required), ``format`` (default ``auto``), ``kind`` (default ``auto``): read as ``data.path``;
- ``limit``: evaluate the first ``limit`` records (default: all);
- ``n`` (default 1: greedy only), ``temperature`` (0.7), ``top_p`` (1.0): sampled answers for pass@k/maj@k;
- ``max_new_tokens``: default ``rollout.max_new_tokens`` in the RL stages, else ``train.eval_max_new_tokens``;
- ``verifiers``: reward functions as ``reward.functions`` (default: ``reward.functions``, else
  ``math_verify``);
- ``batch_size``: prompts (packed rows, pairs) a program call (default 32).

Each set is read once, before the first step, and evaluated by ``eval_run.RecordEvaluator`` (the metrics
of its record kind: see there), the same core ``python -m jaxrl_llm.eval`` runs. Plans add
``eval_set_evaluators(ctx, policy)`` to their own evaluators.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jaxrl_llm.errors import UserError

KEYS = (
    "name",
    "path",
    "format",
    "kind",
    "limit",
    "n",
    "temperature",
    "top_p",
    "max_new_tokens",
    "verifiers",
    "batch_size",
)
DEFAULT_VERIFIERS = ({"name": "math_verify"},)


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """One ``eval.sets`` entry (module docstring); None = the default named there."""

    name: str
    path: str
    format: str = "auto"
    kind: str = "auto"
    limit: int | None = None
    n: int = 1
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int | None = None
    verifiers: tuple[Mapping[str, Any], ...] | None = None
    batch_size: int = 32


def _int(at: str, key: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise UserError(f"{at}.{key}={value!r}: expected an integer >= {lo}")
    return value


def _float(at: str, key: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise UserError(f"{at}.{key}={value!r}: expected a number in [{lo:g}, {hi:g}]")
    return float(value)


def parse_eval_sets(items: Any, *, where: str = "eval.sets") -> list[EvalSet]:
    """Validated ``EvalSet`` s from config entries; a ``UserError`` names the entry and what is wrong."""
    if hasattr(items, "to_dict"):
        items = items.to_dict()
    if isinstance(items, str | Mapping) or not isinstance(items, Sequence):
        raise UserError(
            f"{where}: expected a list of {{name, path, ...}} entries, got {type(items).__name__}"
        )
    out: list[EvalSet] = []
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        item = item.to_dict() if hasattr(item, "to_dict") else item
        if not isinstance(item, Mapping):
            raise UserError(f"{at}: expected a mapping with 'name' and 'path', got {item!r}")
        unknown = sorted(set(item) - set(KEYS))
        if unknown:
            raise UserError(f"{at}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(KEYS)}")
        for key in ("name", "path"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise UserError(f"{at}: '{key}' must be a non-empty string")
        name = item["name"]
        if not all(ch.isalnum() or ch in "-_." for ch in name):
            raise UserError(f"{at}.name={name!r}: use letters, digits, '-', '_' and '.' (it names metrics)")
        fields: dict[str, Any] = {"name": name, "path": item["path"]}
        for key in ("format", "kind"):
            if item.get(key) is not None:
                if not isinstance(item[key], str):
                    raise UserError(f"{at}.{key}={item[key]!r}: expected a string")
                fields[key] = item[key]
        for key, lo in (("limit", 1), ("n", 1), ("max_new_tokens", 1), ("batch_size", 1)):
            if item.get(key) is not None:
                fields[key] = _int(at, key, item[key], lo)
        if item.get("temperature") is not None:
            fields["temperature"] = _float(at, "temperature", item["temperature"], 0.0, 100.0)
        if item.get("top_p") is not None:
            fields["top_p"] = _float(at, "top_p", item["top_p"], 1e-6, 1.0)
        if item.get("verifiers") is not None:
            from jaxrl_llm.reward import parse_specs

            verifiers = item["verifiers"]
            parse_specs(verifiers, where=f"{at}.verifiers")  # raises naming the entry
            fields["verifiers"] = tuple(dict(v) for v in verifiers)
        spec = EvalSet(**fields)
        if spec.n > 1 and spec.temperature <= 0:
            raise UserError(f"{at}: n={spec.n} samples at temperature 0 are all the greedy answer")
        out.append(spec)
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise UserError(
            f"{where}: set name(s) {sorted({n for n in names if names.count(n) > 1})} listed twice"
        )
    return out


def load_records(
    path: str, *, format: str = "auto", kind: str = "auto", limit: int | None = None, where: str = "data"
) -> tuple[list[dict], str, Any]:
    """``(records, kind, counts)`` of an evaluation dataset: read and validated as training data is (bad
    records skipped and counted), the first ``limit`` kept."""
    from jaxrl_llm.data.load import load_dataset, require_records

    loaded = load_dataset(path, format=format, kind=kind, on_error="skip")
    require_records(loaded, None, where)
    records = loaded.records[:limit] if limit else loaded.records
    return records, loaded.kind, loaded.counts


def eval_set_evaluators(ctx: Any, policy: Callable[[Any], Any] = lambda params: params) -> list[Callable]:
    """The loop's evaluators of ``eval.sets``: ``(state, step) -> {"<set>/<metric>": value}``; ``policy``
    picks the evaluated model's parameters out of the trained ones (PPO's ``params["policy"]``)."""
    import jax
    from flax import nnx

    from jaxrl_llm.reward import RewardSet

    from .eval_run import EvalSettings, RecordEvaluator
    from .loop import log

    cfg, run = ctx.cfg, ctx.run
    sets = parse_eval_sets(cfg.eval.sets)
    if not sets:
        return []
    if jax.process_count() > 1:
        log("eval.sets is skipped: named evaluation sets run in single-process runs only")
        return []
    graphdef = nnx.split(run.model, nnx.Param)[0]  # the policy (or reward model) alone
    head = "score" if getattr(run.model, "score", None) is not None else "lm"
    rl = cfg.stage in ("grpo", "ppo")
    out = []
    for i, spec in enumerate(sets):
        where = f"eval.sets[{i}] ({spec.name})"
        records, kind, counts = load_records(
            spec.path, format=spec.format, kind=spec.kind, limit=spec.limit, where=where
        )
        default_tokens = cfg.rollout.max_new_tokens if rl else cfg.train.eval_max_new_tokens
        settings = EvalSettings(
            n=spec.n,
            temperature=spec.temperature,
            top_p=spec.top_p,
            max_new_tokens=spec.max_new_tokens or int(default_tokens),
            stop=tuple(cfg.rollout.stop) if rl else (),
            batch_size=spec.batch_size,
            seq_len=int(cfg.train.seq_len),
            seed=int(cfg.seed),
        )
        rewards = None
        if kind in ("prompt", "conversation") and head == "lm":
            functions = spec.verifiers or list(cfg.reward.functions) or DEFAULT_VERIFIERS
            rewards = RewardSet(functions, tokenizer=run.tokenizer, on_error="zero")
        try:
            evaluator = RecordEvaluator(
                graphdef, run.renderer, records, kind, settings, rewards=rewards, mesh=run.mesh, head=head
            )
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        log(
            f"eval set {spec.name!r}: {len(records)} {kind} records from {spec.path} ({counts.rejected} rejected)"
        )
        out.append(_named(spec.name, evaluator, policy))
    return out


def _named(name: str, evaluator: Any, policy: Callable[[Any], Any]) -> Callable:
    def evaluate(state: Any, step: int) -> dict[str, float]:
        result = evaluator(policy(state.params))
        return {f"{name}/{k}": v for k, v in result.metrics.items()}

    return evaluate
