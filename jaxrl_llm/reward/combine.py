"""Rewards combined: every component computed, weighted into a total, and reported one by one.

``RewardSet(specs, tokenizer=...)`` (or ``RewardSet.from_config([{"name", "weight", "params"}, ...])``)
scores a batch of completions -> ``RewardResult``:

- ``total``: float32[N], the weighted sum of the components;
- ``components``: per component, float32[N] raw values (before weighting; 0 where it does not apply or failed);
- ``applies``: per component, bool[N]: the value is real (not "does not apply", not a failure);
- ``loss_mask``: bool[N], False for samples a failing host reward excluded (``on_error="exclude"``);
- ``errors``: what failed, per component: count and the first few messages with their sample index.

Rows ``i*n .. i*n+n-1`` are the ``n`` samples of prompt ``i`` (the sampler's order): ``metrics(n)`` reports
for every component and for the total the mean, std, min and max over the samples it applies to, and the
fraction of prompt groups whose values have zero variance (a flat group gives GRPO no signal).

Host rewards run on a thread pool (each call in its own thread; code execution supervises a subprocess from
there, so calls run in parallel). A host call that raises, returns NaN or infinity, or exceeds
``host_timeout_s`` gets the fallback: ``on_error="zero"`` scores it 0, ``"exclude"`` also drops the sample
from the loss (``loss_mask``). Either way it is counted and its error logged; training never stops for it.
A Python function cannot be interrupted: a timed-out call keeps its thread until it returns, and its result
is discarded (code execution, which can hang for real, kills its process group at its own timeout).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import device as _device  # noqa: F401  (registers the device rewards)
from . import host as _host  # noqa: F401  (registers the host rewards)
from .base import RewardError, RewardSpec, parse_specs
from .device import SampleArrays

log = logging.getLogger(__name__)
ON_ERROR = ("zero", "exclude")
_SHOWN_ERRORS = 5


@dataclasses.dataclass
class RewardResult:
    total: np.ndarray
    components: dict[str, np.ndarray]
    applies: dict[str, np.ndarray]
    loss_mask: np.ndarray
    errors: dict[str, dict[str, Any]]
    weights: dict[str, float]

    def metrics(self, group_size: int = 1) -> dict[str, float]:
        """``reward/<component>/{mean,std,min,max,zero_std_groups,applies,errors}`` and ``reward/total/...``."""
        out: dict[str, float] = {}
        for key, values in [*self.components.items(), ("total", self.total)]:
            applies = self.applies.get(key, self.loss_mask)
            out.update(_stats(f"reward/{key}", values, applies, group_size))
            if key in self.errors:
                out[f"reward/{key}/errors"] = float(self.errors[key]["count"])
        return out

    def samples(self, completions: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Per sample: total, each component's value (None where it does not apply) and the completion."""
        rows = []
        for i in range(len(self.total)):
            row: dict[str, Any] = {"total": float(self.total[i]), "in_loss": bool(self.loss_mask[i])}
            for key, values in self.components.items():
                row[key] = float(values[i]) if self.applies[key][i] else None
            if completions is not None:
                row["completion"] = completions[i]
            rows.append(row)
        return rows


def _stats(prefix: str, values: np.ndarray, applies: np.ndarray, group_size: int) -> dict[str, float]:
    real = values[applies]
    out = {f"{prefix}/applies": float(applies.mean()) if len(applies) else 0.0}
    if len(real):
        out.update(
            {
                f"{prefix}/mean": float(real.mean()),
                f"{prefix}/std": float(real.std()),
                f"{prefix}/min": float(real.min()),
                f"{prefix}/max": float(real.max()),
            }
        )
    if group_size > 1 and len(values) % group_size == 0:
        groups = values.reshape(-1, group_size)
        out[f"{prefix}/zero_std_groups"] = float((groups.std(axis=1) == 0).mean())
    return out


class RewardSet:
    """The configured reward components; see the module docstring.

    Args:
      specs: ``RewardSpec`` s or config entries ``{"name", "weight", "params", "label"?}``.
      tokenizer: the policy's tokenizer (device rewards whose parameters are text, ground-truth answer ids).
      on_error: ``"zero"`` or ``"exclude"``: what a failing host call gives its sample.
      host_timeout_s: time limit of one host call.
      workers: threads for host calls (default: 4 per CPU core).
      mesh: where learned reward models live and run, sharded (None: the default device).
    """

    def __init__(
        self,
        specs: Sequence[RewardSpec | Mapping[str, Any]],
        *,
        tokenizer: Any = None,
        on_error: str = "zero",
        host_timeout_s: float = 30.0,
        workers: int | None = None,
        mesh: Any = None,
    ):
        if on_error not in ON_ERROR:
            raise RewardError(f"on_error={on_error!r}; valid: {', '.join(ON_ERROR)}")
        self.specs = parse_specs(specs)
        self.tokenizer, self.on_error, self.host_timeout_s = tokenizer, on_error, host_timeout_s
        self.params = {}
        for spec in self.specs:
            fn = spec.reward
            params = fn.bind(spec.params)
            self.params[spec.key] = fn.prepare(params, tokenizer) if fn.prepare else params
        self.models = {
            s.key: _load_model(self.params[s.key], mesh) for s in self.specs if s.reward.kind == "model"
        }
        self._device = jax.jit(self.device_components)
        self.workers = workers or 4 * (_cpus() or 1)
        self._pool = concurrent.futures.ThreadPoolExecutor(self.workers, "reward")

    @classmethod
    def from_config(cls, cfg: Any, *, tokenizer: Any = None, mesh: Any = None) -> RewardSet:
        """From a config's ``reward`` section (``reward.functions``, ``on_error``, ``host_timeout_s``, ``workers``);
        ``mesh``: the reward models' (``reward.mesh``)."""
        section = cfg.reward
        return cls(
            list(section.functions),
            tokenizer=tokenizer,
            on_error=section.on_error,
            host_timeout_s=section.host_timeout_s,
            workers=section.workers,
            mesh=mesh,
        )

    def close(self) -> None:
        """Stops the host-reward threads (calls still running finish on their own)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> RewardSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ device

    def device_components(self, arrays: SampleArrays) -> dict[str, jax.Array]:
        """Pure and jittable: every device component over a batch ``[N, ...]`` -> ``{key: float32[N]}``.

        Extra leading axes (``[G, n, ...]``) work too: each function is vmapped over all of them.
        """
        out = {}
        for spec in self.specs:
            if spec.reward.kind != "device":
                continue
            fn, params = spec.reward.fn, self.params[spec.key]
            per_sample = lambda s, fn=fn, params=params: fn(s, **params)
            batched = per_sample
            for _ in range(arrays.completion_ids.ndim - 1):
                batched = jax.vmap(batched)
            out[spec.key] = batched(arrays).astype(jnp.float32)
        return out

    # ------------------------------------------------------------------------------------------ all

    def __call__(
        self,
        completions: Sequence[str],
        records: Sequence[Mapping[str, Any]],
        arrays: SampleArrays | None = None,
    ) -> RewardResult:
        """Scores ``completions`` (decoded text) answering ``records`` (one per completion), with their token
        ``arrays`` for device rewards (``arrays_for`` builds them)."""
        n = len(completions)
        if len(records) != n:
            raise ValueError(f"{n} completions but {len(records)} records: one record per completion")
        components: dict[str, np.ndarray] = {}
        applies: dict[str, np.ndarray] = {}
        errors: dict[str, dict[str, Any]] = {}
        excluded = np.zeros(n, bool)
        if any(s.reward.kind == "device" for s in self.specs):
            if arrays is None:
                raise RewardError("device rewards are configured: pass the completions' token arrays")
            for key, values in jax.device_get(self._device(arrays)).items():
                components[key], applies[key] = np.asarray(values, np.float32), np.ones(n, bool)
        for spec in self.specs:
            key = spec.key
            if spec.reward.kind == "host":
                values, ok, failed, errs = self._run_host(spec, completions, records)
            elif spec.reward.kind == "model":
                values = self.models[key].score_records(records, completions)
                ok, failed, errs = np.isfinite(values), ~np.isfinite(values), []
                errs = [(int(i), "non-finite score") for i in np.flatnonzero(failed)]
                values = np.where(ok, values, 0.0).astype(np.float32)
            else:
                continue
            components[key], applies[key] = values, ok
            if failed.any():
                errors[key] = {"count": int(failed.sum()), "first": errs[:_SHOWN_ERRORS]}
                log.warning("reward %s failed on %d of %d samples: %s", key, failed.sum(), n, errs[:2])
                if self.on_error == "exclude":
                    excluded |= failed
        components = {s.key: components[s.key] for s in self.specs}  # config order
        weights = {s.key: s.weight for s in self.specs}
        total = np.zeros(n, np.float32)
        for key, values in components.items():
            total += np.float32(weights[key]) * np.where(applies[key], values, 0.0).astype(np.float32)
        return RewardResult(total, components, applies, ~excluded, errors, weights)

    def _run_host(self, spec: RewardSpec, completions: Sequence[str], records: Sequence[Mapping[str, Any]]):
        """(values, applies, failed, [(index, error)]) of one host component over the batch."""
        fn, params, limit = spec.reward.fn, self.params[spec.key], self.host_timeout_s

        def call(i: int) -> tuple[Any, float]:
            start = time.perf_counter()
            value = fn(completions[i], records[i], **params)
            return value, time.perf_counter() - start

        n = len(completions)
        futures = [self._pool.submit(call, i) for i in range(n)]
        concurrent.futures.wait(futures, timeout=limit * math.ceil(n / self.workers) + 1.0)
        values, ok, failed = np.zeros(n, np.float32), np.zeros(n, bool), np.zeros(n, bool)
        errs: list[tuple[int, str]] = []
        for i, future in enumerate(futures):
            if not future.done():
                future.cancel()
                failed[i] = True
                errs.append((i, f"timed out (> {limit:g} s)"))
                continue
            try:
                value, took = future.result()
            except Exception as err:  # a reward bug or bad record must not stop training
                failed[i] = True
                errs.append((i, f"{type(err).__name__}: {err}"[:300]))
                continue
            if took > limit:
                failed[i] = True
                errs.append((i, f"timed out ({took:.1f} s > {limit:g} s)"))
            elif value is None:
                continue  # does not apply to this sample
            elif not isinstance(value, int | float | np.number) or not math.isfinite(float(value)):
                failed[i] = True
                errs.append((i, f"returned {value!r}, not a finite number"))
            else:
                values[i], ok[i] = float(value), True
        return values, ok, failed, errs


def _cpus() -> int | None:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _load_model(params: Mapping[str, Any], mesh: Any = None):
    from .model import RewardModel

    return RewardModel.load(**params, mesh=mesh)


def arrays_for(
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    completion_ids: np.ndarray,
    completion_mask: np.ndarray,
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any = None,
    *,
    answer_len: int = 32,
    field: str = "ground_truth",
) -> SampleArrays:
    """Device-reward inputs for a batch: the token arrays, and each record's ``field`` encoded with the
    policy's ``tokenizer`` into ``answer_ids [N, answer_len]`` (longer answers are cut; no field -> empty)."""
    n = len(records)
    answer = np.zeros((n, answer_len), np.int32)
    answer_mask = np.zeros((n, answer_len), bool)
    for i, record in enumerate(records):
        value = record.get(field)
        if value is None or tokenizer is None:
            continue
        ids = tokenizer.encode(str(value), add_special_tokens=False)[:answer_len]
        answer[i, : len(ids)], answer_mask[i, : len(ids)] = ids, True
    return SampleArrays(
        prompt_ids=jnp.asarray(prompt_ids, jnp.int32),
        prompt_mask=jnp.asarray(prompt_mask, bool),
        completion_ids=jnp.asarray(completion_ids, jnp.int32),
        completion_mask=jnp.asarray(completion_mask, bool),
        answer_ids=jnp.asarray(answer),
        answer_mask=jnp.asarray(answer_mask),
    )
