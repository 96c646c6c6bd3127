"""Memory planner: bytes per device of a training run, from shapes alone, before anything is allocated.

    python -m jaxrl_llm.bench memory --preset llama3.1-8b --mesh data=1,fsdp=8,tensor=1 --stage sft \\
        --batch 8 --seq-len 2048 [--lora] [--remat full] [--param-dtype bfloat16] [--json OUT]

Every figure is per device, for the stage as ``jaxrl_llm.train`` builds it:

- **parameters**: ``nnx.eval_shape`` of the real model (as ``abstract_model``) with the real sharding rules
  (``parallel.tree_shardings``) applied on an abstract mesh of the requested shape; each leaf counts its
  shard (``NamedSharding.shard_shape``). PPO trains an ``ActorCritic``: the policy and a critic on its own
  copy of the backbone, both counted here. With ``--lora`` the model is built with the real adapters
  (``models.lora.apply_lora`` under ``eval_shape``: float32, sharded by their own logical axes) on the
  frozen base (in ``param_dtype``).
- **gradients**: float32 copies of what is trained (every parameter, or with ``--lora`` the trainer's
  ``models.lora.TRAINABLE``), sharded like it (the step casts every gradient to float32 whatever the
  parameter dtype).
- **optimizer state**: ``eval_shape`` of the trainer's own optimizer (``train.optimizer.make_optimizer``,
  AdamW with global-norm clipping) over what is trained. optax keeps Adam's moments in the parameters'
  dtype and the trainer keeps no float32 master copy, so bfloat16 parameters mean bfloat16 moments.
- **activations**: XLA's ``temp_size`` of a compiled forward + backward of the real model with the stage's
  real loss on one micro-batch (``memory_compile``), on simulated CPU devices of the same mesh; ``None``
  with ``--no-compile``. The gradients are that program's output, not its temp, so they are not counted
  twice.
- **reference**: the frozen copy of the initial policy that dpo and kto keep, ppo keeps for its KL reward
  (``rl.kl_coef > 0``) and grpo only with a KL penalty (``rl.beta > 0``: ``--reference``). With
  ``--lora`` the frozen base with the adapters switched off is the reference, so there is no copy.
- **KV cache**: RL stages' rollout cache, ``prompts x group`` rows of ``prompt + new`` slots in the compute
  dtype, sharded as ``KVCache.init`` shards it (rows over the data axes, KV heads over ``tensor``).

``total`` is their sum. For RL stages it is an upper bound (the rollout's cache and the update's
activations live in different phases of an iteration); it leaves out the optimizer's update temporaries
(about one parameter-sized tree) and the batch. The check on it is the **compiled train step peak**: the
trainer's own update (``build_update`` + ``compile_update``) compiled on the same batch, XLA's arguments +
outputs - aliased + temp (RL: the update alone).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from ..errors import UserError
from ..parallel import DEFAULT_RULES, MESH_AXES, named_sharding, tree_shardings

STAGES = ("sft", "pt", "rm", "dpo", "kto", "orpo", "simpo", "grpo", "ppo")
PAIR_STAGES = ("rm", "dpo", "kto", "orpo", "simpo")
RL_STAGES = ("grpo", "ppo")
DEFAULT_LORA_RANK = 16
ROWS = ("parameters", "gradients", "optimizer_state", "activations", "reference", "kv_cache")


@dataclasses.dataclass(frozen=True)
class MemorySpec:
    """What the planner sizes. ``batch`` is rows a step (sft, pt), pairs or KTO examples (pair stages) or
    prompts an iteration (RL: ``rl.prompts_per_iteration``); ``seq_len`` is a row's tokens (sft, pt) or a
    pair side's (rows are ``prompt | chosen | rejected``, at most ``2 * seq_len``); RL rows are
    ``prompt_len + new_tokens``, ``group`` samples a prompt, ``minibatches`` updates an epoch."""

    preset: str
    mesh: tuple[int, int, int] = (1, 1, 1)  # data, fsdp, tensor
    stage: str = "sft"
    batch: int = 8
    seq_len: int = 256
    prompt_len: int = 256
    new_tokens: int = 256
    group: int = 8
    minibatches: int = 1
    accum: int = 1
    lora_rank: int | None = None  # None: every parameter is trained
    remat: str = "none"
    param_dtype: str = "float32"
    state_dtype: str = "param"  # optimizer.state_dtype: the moments in param_dtype, or float32
    dtype: str = "float32"
    scan_layers: bool = True
    reference: bool | None = None  # None: what the stage does by default

    @property
    def devices(self) -> int:
        return math.prod(self.mesh)

    @property
    def data_split(self) -> int:
        return self.mesh[0] * self.mesh[1]

    def model_config(self):
        from ..models import get_preset

        return get_preset(
            self.preset,
            param_dtype=self.param_dtype,
            dtype=self.dtype,
            remat=self.remat,
            scan_layers=self.scan_layers,
        )

    def keeps_reference(self) -> bool:
        """Whether the stage keeps a frozen reference model (see the module docstring)."""
        if self.reference is not None:
            return self.reference
        return self.stage in ("dpo", "kto", "ppo")

    def micro_batch(self) -> tuple[int, int]:
        """``(rows, length)`` of one micro-batch of the update: what the compiled gradient program reads."""
        if self.stage in RL_STAGES:
            return (
                self.batch * self.group // self.minibatches // self.accum,
                self.prompt_len + self.new_tokens,
            )
        if self.stage in PAIR_STAGES:
            from ..data.packing import pair_buckets

            return self.batch // self.accum, max(pair_buckets(self.seq_len))
        return self.batch // self.accum, self.seq_len

    def check(self) -> None:
        """A ``UserError`` naming the first setting that cannot run (checked before any model is built)."""
        if self.stage not in STAGES:
            raise UserError(f"--stage {self.stage!r}: expected one of {', '.join(STAGES)}")
        self.model_config()  # an unknown preset: ModelConfigError (a UserError) with the closest name
        sizes = dict(batch=self.batch, seq_len=self.seq_len, prompt_len=self.prompt_len)
        sizes |= dict(new_tokens=self.new_tokens, group=self.group, minibatches=self.minibatches)
        sizes |= dict(accum=self.accum, lora_rank=1 if self.lora_rank is None else self.lora_rank)
        for name, value in sizes.items():
            if value < 1:
                raise UserError(f"--{name.replace('_', '-')}={value}: must be at least 1")
        if self.reference is False and self.stage == "kto":
            raise UserError("--no-reference: stage kto always reads its reference model")
        if self.reference and self.stage not in ("dpo", "kto", "grpo", "ppo"):
            raise UserError(
                f"--reference: stage {self.stage!r} has no reference model (dpo, kto, grpo, ppo do)"
            )
        split, what = self.data_split, "--batch"
        rows = self.batch * (self.group if self.stage in RL_STAGES else 1)
        per = self.minibatches * self.accum if self.stage in RL_STAGES else self.accum
        if self.stage in RL_STAGES:
            what = "--batch x --group"
            if self.batch % split:
                raise UserError(
                    f"--batch {self.batch} prompts cannot be split over data x fsdp = {split} devices"
                )
        if rows % per or (rows // per) % split:
            detail = f"{rows} rows in {per} micro-batches" if per > 1 else f"{rows} rows"
            raise UserError(
                f"{what}: {detail} cannot be split over data x fsdp = {split} devices "
                "(every micro-batch needs a multiple of it)"
            )


def abstract_mesh(sizes: tuple[int, int, int]) -> AbstractMesh:
    """A mesh of that shape with no devices: enough for shardings and their shard shapes."""
    return AbstractMesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def per_device_bytes(tree: Any, mesh: Any, shardings: Any = None) -> int:
    """Bytes one device holds of an (abstract) tree: each leaf's shard under the rules (``tree_shardings``,
    or ``shardings`` given leaf for leaf)."""
    shardings = tree_shardings(tree, mesh) if shardings is None else shardings
    is_var = lambda x: isinstance(x, nnx.Variable)
    leaves = jax.tree.leaves(tree, is_leaf=is_var)
    found = jax.tree.leaves(shardings, is_leaf=is_var)
    total = 0
    for leaf, sharding in zip(leaves, found, strict=True):
        leaf = leaf.get_value() if is_var(leaf) else leaf
        sharding = sharding.get_value() if is_var(sharding) else sharding
        total += math.prod(sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    return total


def _params(model) -> nnx.State:
    return nnx.state(model, nnx.Param)


def _count(tree: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def abstract_models(spec: MemorySpec):
    """``(trained model, policy)`` as abstract modules: the stage's trained model (a ``CausalLM``, rm's
    ``ScoreModel``, ppo's ``ActorCritic``) and the policy a reference would copy. With ``--lora`` every
    backbone has the adapters ``models.lora.apply_lora`` gives it (rank ``spec.lora_rank``, the default
    targets), as the trainer builds it (``train.setup.with_lora``; ppo's critic gets its own)."""
    from ..models import HEADS
    from ..models.actor_critic import ActorCritic
    from ..models.lora import LoRAConfig, apply_lora

    cfg, lora = spec.model_config(), LoRAConfig(rank=spec.lora_rank or 0)
    build = lambda head: apply_lora(HEADS[head](cfg, rngs=nnx.Rngs(0)), lora)
    if spec.stage == "ppo":
        trained = nnx.eval_shape(lambda: ActorCritic(build("lm"), build("score")))
        return trained, trained.policy
    trained = nnx.eval_shape(lambda: build("score" if spec.stage == "rm" else "lm"))
    return trained, trained


def trainable(spec: MemorySpec) -> Any:
    """The filter of what the optimizer trains, as ``run_stage`` picks it: every parameter, or with LoRA
    ``models.lora.TRAINABLE`` (the adapters, and a score or value head: a fresh head must learn)."""
    from ..models.lora import TRAINABLE

    return nnx.Param if spec.lora_rank is None else TRAINABLE


def kv_cache_bytes(spec: MemorySpec, mesh: Any) -> int:
    """Per-device bytes of the rollout's KV cache (RL stages; 0 otherwise)."""
    if spec.stage not in RL_STAGES:
        return 0
    from ..models import KVCache

    cfg = spec.model_config()
    rows, slots = spec.batch * spec.group, spec.prompt_len + spec.new_tokens
    cache = jax.eval_shape(lambda: KVCache.init(cfg, rows, slots, jnp.dtype(cfg.dtype)))
    # The logical axes KVCache.init (and the sampler's constraint) give each field.
    axes = dict(
        k=("batch", "kv_heads", "head_dim", "cache_seq"),
        v=("batch", "kv_heads", "cache_seq", "head_dim"),
        valid=("batch", "cache_seq"),
        positions=("batch", "cache_seq"),
        index=(),
        lengths=("batch",),
    )
    shardings = {
        name: jax.tree.map(
            lambda x, a=a: named_sharding(a, x.shape, mesh, DEFAULT_RULES, "kv cache"), getattr(cache, name)
        )
        for name, a in axes.items()
    }
    return per_device_bytes({n: getattr(cache, n) for n in axes}, mesh, shardings)


def abstract_figures(spec: MemorySpec) -> dict[str, Any]:
    """Parameter, gradient, optimizer-state, reference and KV-cache bytes per device (no compile, no
    devices), and the parameter counts."""
    from ..train.optimizer import OptimizerConfig, make_optimizer

    mesh = abstract_mesh(spec.mesh)
    trained_model, policy = abstract_models(spec)
    params = _params(trained_model)
    trained = nnx.state(trained_model, trainable(spec))
    tx = make_optimizer(OptimizerConfig(state_dtype=spec.state_dtype), trained)
    opt_state = jax.eval_shape(tx.init, trained)
    grads = jax.tree.map(
        lambda v: v.replace(jax.ShapeDtypeStruct(v.shape, jnp.float32)),
        trained,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    reference = 0
    if spec.keeps_reference() and spec.lora_rank is None:
        reference = per_device_bytes(_params(policy), mesh)
    return {
        "parameters": per_device_bytes(params, mesh),
        "gradients": per_device_bytes(grads, mesh),
        "optimizer_state": per_device_bytes(opt_state, mesh),
        "reference": reference,
        "kv_cache": kv_cache_bytes(spec, mesh),
        "param_count": _count(params),
        "trained_param_count": _count(trained),
    }


def plan_memory(spec: MemorySpec, *, compile: bool = True) -> dict[str, Any]:
    """The plan as one JSON-ready dict: the settings, ``bytes_per_device`` by row (``activations`` None
    without ``compile``) and their ``total``, the parameter counts and the compiled program's analysis."""
    spec.check()
    figures = abstract_figures(spec)
    compiled = None
    if compile:
        from .memory_compile import compiled_figures

        compiled = compiled_figures(spec)
    rows = {name: figures.get(name) for name in ROWS}
    rows["activations"] = None if compiled is None else compiled["gradients"]["temp"]
    rows["total"] = sum(v or 0 for v in rows.values())
    settings = dataclasses.asdict(spec)
    settings["mesh"] = dict(zip(MESH_AXES, spec.mesh, strict=True))
    settings["reference"] = spec.keeps_reference()
    settings["micro_batch"] = dict(zip(("rows", "length"), spec.micro_batch(), strict=True))
    return {
        "settings": settings,
        "devices": spec.devices,
        "param_count": figures["param_count"],
        "trained_param_count": figures["trained_param_count"],
        "bytes_per_device": rows,
        "compiled": compiled,
    }
