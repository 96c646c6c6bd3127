"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685), applied
to a built model by module surgery.

``apply_lora(model, LoRAConfig(rank=8))`` turns every attention and MLP module that holds a targeted
projection into its LoRA subclass (``LoRAAttention``, ``LoRAMLP``) and gives it, per projection
``W [*in, *out]`` (einsum layout, a leading layer axis for the stacked blocks), an ``Adapter`` with
``lora_a [*in, r]`` and ``lora_b [r, *out]`` (``LoRAParam``, float32 whatever the base's dtype):

    y = x @ W + dropout(x) @ A @ B * alpha / r

``A`` is uniform in +-1/sqrt(fan_in) (PEFT's Kaiming init), ``B`` is zero, so the model starts equal to the
base. The base weights keep their paths (``blocks/attn/q``), so HF import/export, ``optimizer.freeze`` and
everything that merges a graph definition with parameters read them as before; a LoRA run trains only
``TRAINABLE`` (the adapters, and a score or value head when the model has one). Adapters are stacked on the
blocks' layer axis like the weights, so ``scan_layers`` and ``remat`` apply to them unchanged; their logical
axes are the weight's input axes (A) and output axes (B), the rank axis replicated.

Every adapter reads its projection's input, as PEFT's do; the attention's output projection ``o`` reads
the heads ``[B, T, H, D]``, so its ``A`` is ``[H, D, r]``. ``adapters_off(model)`` is the graph definition
of the same model with every adapter skipped: fed the policy's own parameters it is the base model (the
frozen reference of DPO, KTO and RL without a second copy of the weights). ``merged(model)`` folds the
adapters into plain weights (HF export); ``lora_io.save_peft`` writes a PEFT adapter directory.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_llm.errors import UserError

from ..parallel import DEFAULT_RULES, named_sharding
from .attention import Attention
from .layers import MLP, dense

# (module kind, weight) -> (how many leading axes of the weight are inputs, the HF module it is). The paths
# users target are ``.../attn/q`` etc. (jaxrl_llm.config.schema.LORA_MODULES mirrors them; a test checks).
PROJECTIONS: dict[tuple[str, str], tuple[int, str]] = {
    ("attn", "q"): (1, "self_attn.q_proj"),
    ("attn", "k"): (1, "self_attn.k_proj"),
    ("attn", "v"): (1, "self_attn.v_proj"),
    ("attn", "o"): (2, "self_attn.o_proj"),
    ("mlp", "gate"): (1, "mlp.gate_proj"),
    ("mlp", "up"): (1, "mlp.up_proj"),
    ("mlp", "down"): (1, "mlp.down_proj"),
}
DEFAULT_TARGETS = r"(attn/(q|k|v|o)|mlp/(gate|up|down))$"


class LoRAError(UserError):
    """A LoRA setting that does not fit the model (a targets pattern that matches no projection)."""


class LoRAParam(nnx.Param):
    """A LoRA matrix (``lora_a`` or ``lora_b``): what a LoRA run trains, checkpoints and exports."""


class LoRASeed(nnx.Param):
    """uint32 [L]: per-layer dropout seeds, drawn again for every training forward (``use_dropout``); a
    ``Param`` only so that the training state carries it. Never trained, saved or exported."""


ADAPTER_STATE = nnx.Any(LoRAParam, LoRASeed)  # everything apply_lora adds
# What a LoRA run trains: the adapters, and heads that start untrained (a reward model's score head, PPO's
# value head), as PEFT's ``modules_to_save``.
TRAINABLE = nnx.Any(LoRAParam, nnx.PathContains("score"), nnx.PathContains("value_head"))


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """The ``lora.*`` keys: ``rank`` 0 = no adapters; ``alpha`` None = 2 x rank; ``targets`` a regex searched
    in each projection's path (``blocks/attn/q``)."""

    rank: int = 0
    alpha: float | None = None
    dropout: float = 0.0
    targets: str = DEFAULT_TARGETS

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.rank

    @classmethod
    def from_config(cls, section: Any) -> LoRAConfig:
        """From a config's ``lora`` section (None, as in configs written before it existed: no LoRA)."""
        if section is None:
            return cls()
        return cls(
            rank=int(section.rank),
            alpha=None if section.alpha is None else float(section.alpha),
            dropout=float(section.dropout),
            targets=section.targets or DEFAULT_TARGETS,
        )


class Adapter(nnx.Module):
    """One projection's adapter. ``__call__`` is the adapter's term for an input; ``delta`` its weight."""

    def __init__(self, a: LoRAParam, b: LoRAParam, *, n_in: int, scale: float, dropout: float, seed=None):
        self.lora_a, self.lora_b = a, b
        self.n_in, self.scale, self.dropout = n_in, scale, dropout
        self.seed = seed  # LoRASeed when dropout > 0
        self.enabled = True  # False in ``adapters_off``'s graph definition
        self.training = False  # True only inside a training forward (``use_dropout``)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., *in] -> the adapter's term [..., *out] in x's dtype."""
        if self.training and self.seed is not None:
            key = jax.random.fold_in(jax.random.key(0), self.seed[...])
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        h = dense(x, self.lora_a[...], self.n_in)  # [..., r]
        return (dense(h, self.lora_b[...]) * self.scale).astype(x.dtype)

    def delta(self) -> jax.Array:
        """float32 ``A B alpha / r`` shaped as the weight (with its layer axis when the adapter has one)."""
        a, b = self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32)
        lead = a.ndim - self.n_in - 1
        a2 = a.reshape(*a.shape[:lead], -1, a.shape[-1])
        b2 = b.reshape(*b.shape[: lead + 1], -1)
        out = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST) * self.scale
        return out.reshape(*a.shape[:-1], *b.shape[lead + 1 :])


def _adapter(module: nnx.Module, name: str) -> Adapter | None:
    adapter = vars(module).get(f"lora_{name}")
    return adapter if adapter is not None and adapter.enabled else None


class LoRAAttention(Attention):
    """Attention with adapters, each on its projection's input: q, k, v (``_project``) and o (``_output``,
    the heads [B, T, H, D] an adapter with two input axes reads)."""

    def _project(self, x: jax.Array, name: str) -> jax.Array:
        y = super()._project(x, name)
        adapter = _adapter(self, name)
        return y if adapter is None else y + adapter(x).astype(y.dtype)

    def _output(self, out: jax.Array) -> jax.Array:
        y = super()._output(out)
        adapter = _adapter(self, "o")
        return y if adapter is None else y + adapter(out).astype(y.dtype)


class LoRAMLP(MLP):
    """The gated MLP with an adapter on each projection's input."""

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = self._linear(x, "gate"), self._linear(x, "up")
        return self._linear(self.act(gate) * up, "down")

    def _linear(self, x: jax.Array, name: str) -> jax.Array:
        y = dense(x, getattr(self, name)[...])
        adapter = _adapter(self, name)
        return y if adapter is None else y + adapter(x).astype(y.dtype)


_WRAPPED = {Attention: ("attn", LoRAAttention), MLP: ("mlp", LoRAMLP)}


def projection_paths(model: nnx.Module) -> list[str]:
    """Every projection LoRA can target in ``model``, as ``'/'``-joined paths (``blocks/attn/q``)."""
    out = []
    for path, module in nnx.iter_graph(model):
        kind = next((k for cls, (k, _) in _WRAPPED.items() if isinstance(module, cls)), None)
        if kind is not None:
            prefix = "/".join(map(str, path))
            out += [f"{prefix}/{name}" for k, name in PROJECTIONS if k == kind]
    return out


@dataclasses.dataclass(frozen=True)
class _Spec:
    """One adapter to make: where it goes and its arrays' shapes and logical axes (a layer axis first)."""

    module: Any
    name: str
    n_in: int
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    a_axes: tuple  # per layer, as the weight's metadata names them
    b_axes: tuple
    layers: tuple  # ("layers",) for the stacked blocks, else ()
    bound: float

    @classmethod
    def of(cls, module: Any, name: str, n_in: int, rank: int) -> _Spec:
        weight = getattr(module, name)
        axes = tuple(weight.get_metadata().get("axes", ()))
        lead = len(weight.shape) - len(axes)  # the stacked blocks' layer axis
        stack, inputs, outputs = (
            weight.shape[:lead],
            weight.shape[lead : lead + n_in],
            weight.shape[lead + n_in :],
        )
        return cls(
            module,
            name,
            n_in,
            (*stack, *inputs, rank),
            (*stack, rank, *outputs),
            (*axes[:n_in], None),
            (None, *axes[n_in:]),
            ("layers",) * lead,
            1.0 / math.sqrt(math.prod(inputs)),
        )


def _arrays(specs: list[_Spec], seed: int, dropout: bool, mesh, rules) -> list[tuple]:
    """``(A, B, seeds or None)`` of every adapter, from one compiled program (born sharded on ``mesh``)."""

    sizes = [math.prod(s.a_shape) for s in specs]
    starts = [sum(sizes[:i]) for i in range(len(specs))]

    def init():  # one draw for every A, cut to size (one random op compiles faster than one per shape)
        u = jax.random.uniform(jax.random.key(seed), (sum(sizes),), jnp.float32, -1.0, 1.0)
        return [
            (
                (u[start : start + size] * s.bound).reshape(s.a_shape),
                jnp.zeros(s.b_shape, jnp.float32),
                jnp.zeros(s.a_shape[: len(s.layers)], jnp.uint32) if dropout else None,
            )
            for s, start, size in zip(specs, starts, sizes, strict=True)
        ]

    if mesh is None:
        return jax.jit(init)()
    shardings = [
        (
            named_sharding((*s.layers, *s.a_axes), s.a_shape, mesh, rules, "lora_a"),
            named_sharding((*s.layers, *s.b_axes), s.b_shape, mesh, rules, "lora_b"),
            named_sharding(s.layers, s.a_shape[: len(s.layers)], mesh, rules, "seed") if dropout else None,
        )
        for s in specs
    ]
    with jax.set_mesh(mesh):
        return jax.jit(init, out_shardings=shardings)()


def apply_lora(model: nnx.Module, cfg: LoRAConfig, *, seed: int = 0, mesh=None, rules=DEFAULT_RULES):
    """Adds adapters (``cfg``) to ``model`` in place and returns it (unchanged when ``cfg.rank`` is 0).

    Raises ``LoRAError`` when ``cfg.targets`` matches no projection (naming those there are) and when the
    model already has adapters.
    """
    if cfg.rank <= 0:
        return model
    if has_lora(model):
        raise LoRAError("the model already has LoRA adapters")
    try:
        regex = re.compile(cfg.targets)
    except re.error as err:
        raise LoRAError(f"lora.targets={cfg.targets!r}: not a valid regular expression ({err})") from None
    specs = []
    for path, module in list(nnx.iter_graph(model)):
        if type(module) in _WRAPPED:
            kind, prefix = _WRAPPED[type(module)][0], "/".join(map(str, path))
            specs += [
                _Spec.of(module, name, PROJECTIONS[k, name][0], cfg.rank)
                for k, name in PROJECTIONS
                if k == kind and regex.search(f"{prefix}/{name}")
            ]
    if not specs:
        raise LoRAError(
            f"lora.targets={cfg.targets!r} matches none of the model's projections: "
            + ", ".join(projection_paths(model))
        )
    for s, (a, b, seeds) in zip(specs, _arrays(specs, seed, cfg.dropout > 0, mesh, rules), strict=True):
        adapter = Adapter(
            LoRAParam(a, axes=s.a_axes),
            LoRAParam(b, axes=s.b_axes),
            n_in=s.n_in,
            scale=cfg.scale,
            dropout=cfg.dropout,
            seed=None if seeds is None else LoRASeed(seeds, axes=()),
        )
        setattr(s.module, f"lora_{s.name}", adapter)
        if type(s.module) in _WRAPPED:  # Attention -> LoRAAttention, MLP -> LoRAMLP
            s.module.__class__ = _WRAPPED[type(s.module)][1]
    return model


def adapters(model: nnx.Module) -> list[tuple[str, Adapter]]:
    """``(weight path, adapter)`` for every adapter of ``model`` (``blocks/attn/q``)."""
    out = []
    for path, module in nnx.iter_graph(model):
        if isinstance(module, LoRAAttention | LoRAMLP):
            prefix = "/".join(map(str, path))
            out += [
                (f"{prefix}/{name}", vars(module)[f"lora_{name}"])
                for _, name in PROJECTIONS
                if f"lora_{name}" in vars(module)
            ]
    return out


def has_lora(model: nnx.Module) -> bool:
    return any(isinstance(m, Adapter) for _, m in nnx.iter_graph(model))


def config_of(model: nnx.Module) -> LoRAConfig | None:
    """The ``LoRAConfig`` that gives another model the same adapters as ``model`` (None without any)."""
    found = adapters(model)
    if not found:
        return None
    first = found[0][1]
    rank = first.lora_a.shape[-1]
    names = "|".join(sorted({re.escape("/".join(p.split("/")[-2:])) for p, _ in found}))
    return LoRAConfig(rank=rank, alpha=first.scale * rank, dropout=first.dropout, targets=f"(^|/)({names})$")


def like(source: nnx.Module, target: nnx.Module) -> nnx.Module:
    """``target`` with the adapters ``source`` has (same rank, scale, targets); ``target`` when it has none.
    For graph definitions of the same model built otherwise (another compute dtype)."""
    cfg = config_of(source)
    return target if cfg is None else apply_lora(target, cfg)


def adapters_off(model: nnx.Module) -> nnx.GraphDef:
    """The graph definition of ``model`` (split on ``nnx.Param``) with every adapter skipped: merged with
    ``model``'s own parameters it computes the base model."""
    found = [a for _, a in adapters(model)]
    for a in found:
        a.enabled = False
    try:
        return nnx.split(model, nnx.Param)[0]
    finally:
        for a in found:
            a.enabled = True


def use_dropout(model: nnx.Module, key: jax.Array) -> None:
    """Turns on the adapters' dropout for this forward (a training one), with masks drawn from ``key``.
    A no-op for a model without adapters or without dropout. Call it on a model merged inside the trace."""
    for i, (_, a) in enumerate(adapters(model)):
        if a.seed is not None:
            a.training = True
            # A new variable, not a write: the seed's may belong to an outer trace (state split outside).
            a.seed = a.seed.replace(jax.random.bits(jax.random.fold_in(key, i), a.seed.shape, jnp.uint32))


def merged(model: nnx.Module) -> nnx.Module:
    """A model without adapters whose weights are ``W + A B alpha / r`` (in the base's dtype); ``model``
    itself when it has none. ``model`` is left as it is."""
    if not has_lora(model):
        return model
    clone = nnx.merge(*nnx.split(model))  # new modules over the same variables
    for _, module in list(nnx.iter_graph(clone)):
        if not isinstance(module, LoRAAttention | LoRAMLP):
            continue
        for _, name in PROJECTIONS:
            adapter = vars(module).get(f"lora_{name}")
            if adapter is None:
                continue
            weight = getattr(module, name)  # shared with ``model``: replaced, not written to
            value = (weight[...].astype(jnp.float32) + adapter.delta()).astype(weight.dtype)
            setattr(module, name, weight.replace(value))
            delattr(module, f"lora_{name}")
        module.__class__ = type(module).__mro__[1]
    return clone


def trained_count(model: nnx.Module) -> int:
    """Parameters a LoRA run trains (``TRAINABLE``)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, TRAINABLE)))
