"""The decoder: embeddings, a stack of identical blocks, a final norm, and a head.

Blocks are created with ``nnx.vmap``, so every block parameter carries a leading layer axis. The forward
runs them either with ``lax.scan`` (``scan_layers``: one compiled block, fast compiles for deep models) or
unrolled (more room for XLA to fuse across layers). Per-layer differences (Gemma's sliding windows, Gemma
3's local RoPE base) are data, not structure, so both paths are the same code.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from ..parallel import constrain
from .attention import Attention, AttentionMask, make_mask, write_slots
from .cache import KVCache
from .config import ModelConfig
from .layers import MLP, Embed, RMSNorm, dense, dtype_of, param, rope_inv_freq, softcap


class Block(nnx.Module):
    """Pre-norm residual block (plus Gemma 2's post-norms when ``cfg.post_norms``)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg)
        self.mlp = MLP(cfg, rngs=rngs)
        if cfg.post_norms:
            self.attn_post_norm = RMSNorm(cfg.hidden_size, cfg)
            self.mlp_post_norm = RMSNorm(cfg.hidden_size, cfg)
        self.post_norms = cfg.post_norms

    def __call__(self, x, positions, mask, window, inv_freq, kv=None, index=None):
        h, kv = self.attn(self.attn_norm(x), positions, mask, window, inv_freq, kv, index)
        if self.post_norms:
            h = self.attn_post_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.post_norms:
            h = self.mlp_post_norm(h)
        return constrain(x + h, ("batch", "seq", "embed")), kv


@struct.dataclass
class ModelOutput:
    logits: jax.Array | None  # float32[B, T, V] (None for score models)
    hidden: jax.Array  # [B, T, E] after the final norm
    scores: jax.Array | None = None  # float32[B, T]: score head (reward model) or value head (critic)
    cache: KVCache | None = None


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Decoder(nnx.Module):
    """Embeddings -> blocks -> final norm. ``forward`` returns hidden states; heads live in subclasses."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg, rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=cfg.num_layers)
        def make_blocks(rngs):
            return Block(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg)
        self.windows = tuple(w or 0 for w in cfg.layer_windows())

    def init_cache(
        self, batch: int, max_len: int, dtype=None, *, mesh=None, per_row: bool = False
    ) -> KVCache:
        """An empty KV cache for this model (sharded on ``mesh`` when given); see :class:`KVCache`."""
        return KVCache.init(self.cfg, batch, max_len, dtype, mesh=mesh, per_row=per_row)

    def layer_states(self) -> tuple[nnx.State, ...]:
        """Each block's parameters as its own arrays (slices of the stacked ``[L, ...]`` parameters).

        A decode loop computes these once, outside the loop, and passes them as ``forward(..., layers=)``:
        slicing a stacked parameter copies it on XLA, so slicing inside the loop would copy every weight at
        every generated token.
        """
        _, state = nnx.split(self.blocks)
        return tuple(jax.tree.map(lambda a, i=i: a[i], state) for i in range(self.cfg.num_layers))

    def _run_blocks(self, x, positions, mask: AttentionMask, cache: KVCache | None, layers=None):
        graphdef, state = nnx.split(self.blocks)
        # What differs between layers (window, RoPE base) is scanned data, so all layers share one program.
        windows = jnp.asarray(self.windows, jnp.int32)
        inv_freqs = jnp.asarray(
            np.stack(
                [rope_inv_freq(self.cfg.head_dim, theta, scaling) for theta, scaling in self.cfg.layer_rope()]
            )
        )
        index = None if cache is None else cache.index

        def layer(x, xs):
            block_state, window, inv_freq, kv = xs
            return nnx.merge(graphdef, block_state)(x, positions, mask, window, inv_freq, kv, index)

        if self.cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[self.cfg.remat])
        kv = None if cache is None else (cache.k, cache.v)
        if self.cfg.scan_layers and layers is None:
            stacked = (
                None if kv is None else (jnp.stack(kv[0]), jnp.stack(kv[1]))
            )  # copies: scan needs [L, ...]
            x, new_kv = jax.lax.scan(layer, x, (state, windows, inv_freqs, stacked))
            if new_kv is not None:  # back to one array per layer
                new_kv = tuple(tuple(a[i] for i in range(self.cfg.num_layers)) for a in new_kv)
            return x, new_kv
        new_kv = ([], [])
        for i in range(self.cfg.num_layers):
            block_state = layers[i] if layers is not None else jax.tree.map(lambda a, i=i: a[i], state)
            layer_kv = None if kv is None else (kv[0][i], kv[1][i])
            x, out = layer(x, (block_state, windows[i], inv_freqs[i], layer_kv))
            if out is not None:
                new_kv[0].append(out[0])
                new_kv[1].append(out[1])
        return x, None if kv is None else (tuple(new_kv[0]), tuple(new_kv[1]))

    def forward_hidden(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        layers: tuple[nnx.State, ...] | None = None,
        shared: jax.Array | None = None,
    ):
        """tokens: int32[B, T] -> (hidden [B, T, E], updated cache or None).

        ``attention_mask`` (bool/int [B, T], 1 = real token) allows left and right padding. ``positions``
        default to the count of real tokens before each one (continuing from the cache), which is what HF
        computes for padded generation. ``layers`` (from :meth:`layer_states`) are the blocks' parameters
        already sliced per layer, for decode loops. ``segment_ids`` (int32[B, T], 0 = padding, 1.. = the document within
        a packed row) keeps packed documents from attending to each other; positions then restart at 0 in
        every document unless given. ``shared`` (bool[B, T], with ``segment_ids``) marks tokens that every
        later segment of the row sees too: a prompt followed by several answers (pass their positions).
        """
        b, t = tokens.shape
        if cache is not None:
            _check_fits(cache, t)
            if segment_ids is not None:
                raise ValueError(
                    "segment_ids (packed documents) are for training forwards, not cached decoding"
                )
        valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        if segment_ids is not None:
            valid = valid & (segment_ids > 0)
        tokens = jnp.where(valid, tokens, 0)  # whatever id pads a row, it embeds as a real (masked) token
        start = jnp.zeros((b,), jnp.int32) if cache is None else cache.lengths[:b]
        if positions is None and segment_ids is not None:
            positions = segment_positions(segment_ids)
        elif positions is None:
            positions = jnp.maximum(start[:, None] + jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)
        positions = positions.astype(jnp.int32)
        if cache is None:
            mask = make_mask(positions, valid, positions, valid, jnp.arange(t), segment_ids, shared)
            if shared is None:  # the same mask as segment ids, for the kernels that take them
                segments = valid.astype(jnp.int32) if segment_ids is None else segment_ids
                mask = mask.replace(segments=jnp.where(valid, segments, 0).astype(jnp.int32))
        else:
            per_row = cache.index.ndim == 1  # a slot-per-request cache: each row writes at its own index
            slots = (cache.index[:b, None] if per_row else cache.index) + jnp.arange(t)
            cache = cache.replace(
                valid=write_slots(cache.valid, valid, cache.index, axis=1),
                positions=write_slots(cache.positions, positions, cache.index, axis=1),
            )
            mask = make_mask(positions, valid, cache.positions[:b], cache.valid[:b], slots)
        x = constrain(self.embed(tokens), ("batch", "seq", "embed"))
        x, new_kv = self._run_blocks(x, positions, mask, cache, layers)
        if cache is not None:
            written = valid.sum(axis=1, dtype=jnp.int32)
            cache = cache.replace(
                k=new_kv[0],
                v=new_kv[1],
                index=cache.index + t,
                lengths=cache.lengths.at[:b].add(written) if per_row else cache.lengths + written,
            )
        return self.final_norm(x), cache


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """int32[B, T] positions restarting at 0 wherever the segment id changes (packed documents)."""
    t = segment_ids.shape[1]
    index = jnp.arange(t, dtype=jnp.int32)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1
    )
    first = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return index - first


def _check_fits(cache: KVCache, t: int) -> None:
    """Refuses writes past the cache's end where they can be seen: always for the call's own length, and
    for the running index when it is concrete (outside jit). Inside jit the caller bounds the steps."""
    if t > cache.max_len:
        raise ValueError(f"{t} tokens do not fit a KV cache of {cache.max_len} slots; make a larger cache")
    try:
        used = int(jnp.max(cache.index))
    except jax.errors.ConcretizationTypeError:
        return
    if used + t > cache.max_len:
        raise ValueError(
            f"the KV cache holds {used} of {cache.max_len} slots: {t} more tokens do not fit; make a larger cache"
        )


class CausalLM(Decoder):
    """Decoder with a language-model head (tied or untied) and, optionally, a scalar value head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, value_head: bool = False):
        super().__init__(cfg, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(
                rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype_of(cfg.param_dtype)
            )
        self.value_head = ScalarHead(cfg, rngs=rngs, bias=True) if value_head else None

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [B, T, E] -> float32[B, T, V], soft-capped for Gemma 2."""
        if self.cfg.tie_word_embeddings:
            logits = self.embed.attend(hidden)
        else:
            logits = dense(hidden, self.lm_head[...], out_dtype=jnp.float32)
        return softcap(logits.astype(jnp.float32), self.cfg.final_logit_softcap)

    def forward(
        self,
        tokens,
        *,
        positions=None,
        attention_mask=None,
        segment_ids=None,
        cache=None,
        layers=None,
        shared=None,
    ) -> ModelOutput:
        hidden, cache = self.forward_hidden(
            tokens,
            positions=positions,
            attention_mask=attention_mask,
            segment_ids=segment_ids,
            cache=cache,
            layers=layers,
            shared=shared,
        )
        scores = None if self.value_head is None else self.value_head(hidden)
        return ModelOutput(logits=self.logits(hidden), hidden=hidden, scores=scores, cache=cache)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        shared: jax.Array | None = None,
    ) -> jax.Array:
        """tokens: int32[B, T] -> logits: float32[B, T, V]."""
        return self.forward(
            tokens, positions=positions, attention_mask=attention_mask, segment_ids=segment_ids, shared=shared
        ).logits


class ScalarHead(nnx.Module):
    """``[B, T, E] -> float32[B, T]``: HF's ``score`` layer (1 label, no bias) or a PPO value head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, bias: bool = False):
        self.weight = param(rngs, (cfg.hidden_size,), ("embed",), dtype_of(cfg.param_dtype))
        self.bias = param(None, (), (), dtype_of(cfg.param_dtype), "zeros") if bias else None

    def __call__(self, hidden: jax.Array) -> jax.Array:
        out = jnp.einsum(
            "bte,e->bt", hidden, self.weight[...].astype(hidden.dtype), preferred_element_type=jnp.float32
        )
        return out if self.bias is None else out + self.bias[...].astype(jnp.float32)


class ScoreModel(Decoder):
    """Decoder with a scalar head per token: a reward model or a separate PPO critic.

    The sequence score is the head's output at the last real token (``sequence_scores``), as in HF's
    ``*ForSequenceClassification`` with one label.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.score = ScalarHead(cfg, rngs=rngs)

    def forward(
        self,
        tokens,
        *,
        positions=None,
        attention_mask=None,
        segment_ids=None,
        cache=None,
        layers=None,
        shared=None,
    ) -> ModelOutput:
        hidden, cache = self.forward_hidden(
            tokens,
            positions=positions,
            attention_mask=attention_mask,
            segment_ids=segment_ids,
            cache=cache,
            layers=layers,
            shared=shared,
        )
        return ModelOutput(logits=None, hidden=hidden, scores=self.score(hidden), cache=cache)

    def __call__(
        self, tokens, positions=None, attention_mask=None, segment_ids=None, shared=None
    ) -> jax.Array:
        """tokens: int32[B, T] -> per-token scores float32[B, T]."""
        return self.forward(
            tokens, positions=positions, attention_mask=attention_mask, segment_ids=segment_ids, shared=shared
        ).scores


def sequence_scores(scores: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """scores float32[B, T], mask [B, T] -> float32[B]: the score at each row's last real token."""
    t = attention_mask.shape[1]
    last = t - 1 - jnp.argmax(jnp.flip(attention_mask.astype(bool), axis=1), axis=1)
    return jnp.take_along_axis(scores, last[:, None], axis=1)[:, 0]


HEADS: dict[str, Any] = {
    "lm": CausalLM,
    "lm+value": lambda cfg, *, rngs: CausalLM(cfg, rngs=rngs, value_head=True),
    "score": ScoreModel,
}
