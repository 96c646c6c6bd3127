"""Reward functions: a name, a kind, and a registry.

Two kinds:

- ``device``: a pure ``jnp`` function of ONE sample's arrays (``SampleArrays`` fields: prompt and completion
  ids and masks, ground-truth answer ids and mask) returning a float32 scalar. The reward layer ``vmap`` s it
  over the batch (and any group axis) and it can run inside a compiled RL iteration.
- ``host``: Python over one sample's decoded completion text and its record's fields (``ground_truth``,
  ``tools``, ``tests``, ...) returning a float, or ``None`` when the reward does not apply to the sample
  (a tool-call reward on an answer that calls no tool): the component then adds nothing to that sample's
  total and leaves it out of its statistics.
- ``model``: a learned reward model (``reward_model``), loaded once and run batched and jitted.

Functions register under a name with their parameters' defaults; a run's config lists
``{"name", "weight", "params"}`` entries (``RewardSpec``), checked against the registry with errors that list
the valid names and parameters.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from ..errors import UserError

Kind = Literal["device", "host", "model"]
KINDS = ("device", "host", "model")


class RewardError(UserError):
    """A reward configuration mistake: unknown name, bad weight, unknown or ill-typed parameter."""


@dataclasses.dataclass(frozen=True)
class RewardFn:
    """A registered reward function: ``fn(sample, **params)`` (device) or ``fn(text, record, **params)`` (host)."""

    name: str
    kind: Kind
    fn: Callable[..., Any]
    defaults: Mapping[str, Any]
    doc: str
    prepare: Callable[[dict[str, Any], Any], dict[str, Any]] | None = None  # (params, tokenizer) -> params

    def bind(self, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The full parameter set: defaults overridden by ``params``; unknown names are an error."""
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            valid = ", ".join(sorted(self.defaults)) or "none"
            raise RewardError(
                f"reward {self.name!r}: unknown parameter(s) {', '.join(unknown)}; valid: {valid}"
            )
        return {**self.defaults, **params}


REGISTRY: dict[str, RewardFn] = {}


def register(
    name: str, kind: Kind, *, prepare: Callable[[dict[str, Any], Any], dict[str, Any]] | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: registers ``fn`` under ``name``; its keyword-only parameters (with defaults) are its params.

    ``prepare(params, tokenizer)`` turns configured values into what ``fn`` takes, once, before the first call
    (a device reward's marker strings into token ids).
    """
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {KINDS}")

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")
        defaults = {
            p.name: p.default
            for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        missing = [k for k, v in defaults.items() if v is inspect.Parameter.empty]
        if missing:
            raise ValueError(f"reward {name!r}: keyword-only parameters need defaults: {missing}")
        doc = inspect.getdoc(fn) or ""
        REGISTRY[name] = RewardFn(name, kind, fn, defaults, doc.split("\n\n")[0], prepare)
        return fn

    return wrap


def get_reward(name: str) -> RewardFn:
    """The registered function ``name``; an unknown name lists the valid ones."""
    if name not in REGISTRY:
        valid = ", ".join(f"{n} ({r.kind})" for n, r in sorted(REGISTRY.items()))
        raise RewardError(f"unknown reward {name!r}; valid: {valid}")
    return REGISTRY[name]


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """One configured component: a registered function, its weight in the total, its parameters."""

    name: str
    weight: float = 1.0
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    label: str = ""  # the component's name in logs; defaults to ``name`` (set it to use a function twice)

    @property
    def key(self) -> str:
        return self.label or self.name

    @property
    def reward(self) -> RewardFn:
        return get_reward(self.name)


def parse_specs(
    items: Sequence[Mapping[str, Any] | RewardSpec], *, where: str = "reward.functions"
) -> list[RewardSpec]:
    """Validated specs from config entries ``{"name": ..., "weight": 1.0, "params": {...}}``.

    Raises:
      RewardError: naming the entry (``reward.functions[1]``) and what is wrong with it.
    """
    if isinstance(items, Mapping) or isinstance(items, str):
        raise RewardError(
            f"{where}: expected a list of {{name, weight, params}} entries, got {type(items).__name__}"
        )
    specs: list[RewardSpec] = []
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        if isinstance(item, RewardSpec):
            item = dataclasses.asdict(item)
        elif hasattr(item, "to_dict"):  # an ml_collections ConfigDict
            item = item.to_dict()
        if not isinstance(item, Mapping):
            raise RewardError(f"{at}: expected a mapping with 'name', 'weight', 'params', got {item!r}")
        extra = sorted(set(item) - {"name", "weight", "params", "label"})
        if extra:
            raise RewardError(f"{at}: unknown key(s) {', '.join(extra)}; valid: name, weight, params, label")
        if "name" not in item:
            raise RewardError(f"{at}: missing 'name'")
        try:
            fn = get_reward(str(item["name"]))
        except RewardError as err:
            raise RewardError(f"{at}: {err}") from None
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight != weight:
            raise RewardError(f"{at}: weight {weight!r} is not a number")
        params = item.get("params") or {}
        if hasattr(params, "to_dict"):
            params = params.to_dict()
        if not isinstance(params, Mapping):
            raise RewardError(f"{at}: params must be a mapping, got {type(params).__name__}")
        try:
            fn.bind(params)
        except RewardError as err:
            raise RewardError(f"{at}: {err}") from None
        specs.append(RewardSpec(fn.name, float(weight), dict(params), str(item.get("label") or "")))
    keys = [s.key for s in specs]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise RewardError(
            f"{where}: component(s) {', '.join(dup)} listed twice: give each a distinct 'label'"
        )
    if not specs:
        raise RewardError(f"{where}: no reward functions configured")
    return specs
