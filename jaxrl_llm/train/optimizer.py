"""The optimizer: schedule, clipping, weight-decay mask and frozen parameters.

``make_optimizer(OptimizerConfig.from_config(cfg), params)`` returns one ``optax.GradientTransformation``:

    multi_transform({train: chain(clip_by_global_norm, <optimizer>), frozen: set_to_zero}, labels)

Frozen parameters (``optimizer.freeze``, a regex on the '/'-joined parameter path) get a zero update and no
optimizer state, and their gradients do not count towards the clipped global norm. Weight decay is
decoupled (Loshchilov & Hutter, 2019) and masked off vectors and scalars, norm weights and biases: the
decoder's blocks are stacked on a leading layer axis, so a norm weight is ``[L, D]`` and a bias
``[L, H, hd]``, which is why the mask also reads the path and not only ``ndim``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxrl_llm.config import ConfigError

OPTIMIZERS = ("adamw", "adafactor", "lion", "sgd")
SCHEDULES = ("constant", "cosine", "linear")
# Path components that name a parameter weight decay must not touch.
_NO_DECAY = re.compile(r"norm|bias", re.IGNORECASE)


def param_path(keypath: tuple[Any, ...]) -> str:
    """'/'-joined names of a parameter's key path, without NNX's trailing ``value`` (``blocks/attn/q``)."""
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keypath]
    if names and names[-1] == "value":
        names = names[:-1]
    return "/".join(names)


def decay_mask(params: Any) -> Any:
    """Same tree as ``params`` with True where weight decay applies.

    False for parameters with ``ndim < 2`` and for those whose path names a norm or a bias.
    """

    def decays(keypath, leaf) -> bool:
        return leaf.ndim >= 2 and not _NO_DECAY.search(param_path(keypath))

    return jax.tree_util.tree_map_with_path(decays, params)


def freeze_labels(params: Any, pattern: str) -> Any:
    """Same tree as ``params`` with ``"frozen"`` where ``re.search(pattern, path)`` matches, else ``"train"``.

    An empty pattern freezes nothing; a pattern that is not a valid regex raises ``ConfigError``.
    """
    try:
        regex = re.compile(pattern) if pattern else None
    except re.error as err:
        raise ConfigError(f"optimizer.freeze={pattern!r}: not a valid regular expression ({err})") from None

    def label(keypath, _) -> str:
        return "frozen" if regex is not None and regex.search(param_path(keypath)) else "train"

    return jax.tree_util.tree_map_with_path(label, params)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """What the optimizer and its schedule need (the ``optimizer.*`` keys, see ``python -m jaxrl_llm.config``).

    ``total_steps`` is the number of optimizer updates the schedule decays over: ``train.steps`` for the
    stages that update once per step, more for RL stages that update several times per iteration.
    """

    name: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 100
    clip_norm: float | None = 1.0
    freeze: str = ""
    total_steps: int = 1000
    state_dtype: str = "param"

    @classmethod
    def from_config(cls, cfg: Any, *, updates_per_step: int = 1) -> OptimizerConfig:
        """From a validated config's ``optimizer`` section and ``train.steps`` (times ``updates_per_step``)."""
        o = cfg.optimizer
        return cls(
            name=o.name,
            lr=float(o.lr),
            weight_decay=float(o.weight_decay),
            b1=float(o.b1),
            b2=float(o.b2),
            eps=float(o.eps),
            schedule=o.schedule,
            warmup_steps=int(o.warmup_steps),
            clip_norm=None if o.clip_norm is None else float(o.clip_norm),
            freeze=o.get("freeze", "") or "",
            state_dtype=o.get("state_dtype", "param") or "param",
            total_steps=int(cfg.train.steps) * updates_per_step,
        )


def make_schedule(opt: OptimizerConfig) -> optax.Schedule:
    """Learning rate by update: linear 0 -> lr over warmup_steps, then constant, cosine or linear to 0.

    The decay reaches 0 at ``total_steps``; with ``warmup_steps == 0`` update 0 already has the peak lr.
    """
    total = opt.total_steps
    lr, warmup, shape = float(opt.lr), int(opt.warmup_steps), opt.schedule
    decay_steps = max(total - warmup, 1)
    if shape == "constant":
        after = optax.constant_schedule(lr)
    elif shape == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=0.0)
    elif shape == "linear":
        after = optax.linear_schedule(lr, 0.0, decay_steps)
    else:
        raise ValueError(f"optimizer.schedule={shape!r}: expected one of {', '.join(SCHEDULES)}")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _base(opt: OptimizerConfig, schedule: optax.Schedule, mask: Any) -> optax.GradientTransformation:
    name, wd = opt.name, float(opt.weight_decay)
    if name == "adamw":
        return optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=wd, mask=mask)
    if name == "lion":
        return optax.lion(schedule, b1=opt.b1, b2=opt.b2, weight_decay=wd, mask=mask)
    if name == "adafactor":
        # Absolute step sizes (no parameter-scale multiplier) so optimizer.lr means the same as elsewhere.
        return optax.adafactor(
            schedule,
            multiply_by_parameter_scale=False,
            weight_decay_rate=wd or None,
            weight_decay_mask=mask,
        )
    if name == "sgd":
        # Momentum, then decoupled weight decay, then the learning rate: optax.sgd plus masked decay.
        return optax.chain(
            optax.trace(decay=opt.b1, nesterov=False),
            optax.add_decayed_weights(wd, mask),
            optax.scale_by_learning_rate(schedule),
        )
    raise ValueError(f"optimizer.name={name!r}: expected one of {', '.join(OPTIMIZERS)}")


def _float32(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def in_float32(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` run on float32 copies of the gradients and parameters, so its state (Adam's moments) is
    float32 whatever the parameters' dtype; the updates go back in each parameter's dtype."""

    def init(params: Any) -> Any:
        return inner.init(_float32(params))

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        new, state = inner.update(_float32(updates), state, None if params is None else _float32(params))
        dtypes = updates if params is None else params
        return jax.tree.map(lambda n, like: n.astype(like.dtype), new, dtypes), state

    return optax.GradientTransformation(init, update)


def make_optimizer(opt: OptimizerConfig, params: Any) -> optax.GradientTransformation:
    """The optimizer ``opt`` describes, for a params tree shaped like ``params``.

    ``params`` (an ``nnx.State`` of ``nnx.Param`` or any pytree of arrays; abstract shapes suffice) fixes
    the weight-decay mask and the frozen set.
    """
    base = _base(opt, make_schedule(opt), decay_mask(params))
    if opt.state_dtype == "float32":
        base = in_float32(base)
    if opt.clip_norm is not None:
        base = optax.chain(optax.clip_by_global_norm(float(opt.clip_norm)), base)
    pattern = opt.freeze
    if not pattern:
        return base
    labels = freeze_labels(params, pattern)
    return optax.multi_transform({"train": base, "frozen": optax.set_to_zero()}, labels)
