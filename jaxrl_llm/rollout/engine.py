"""Continuous batching: requests of any length share one compiled decode step over a fixed set of slots.

The one-shot ``Sampler`` generates a batch of prompts from start to finish in one program; every row waits
for the longest. The engine instead keeps ``slots`` rows of a per-row KV cache (``KVCache(per_row=True)``:
each row writes at its own index) and runs, on the host, a loop of

1. **admit**: the waiting requests are prefilled into free slots as one batch (one compiled prefill per
   power-of-two rows x prompt-length bucket; their first tokens are drawn there), while the other slots
   keep their state;
2. **decode**: one jitted step draws the next token of every occupied slot (compiled for the smallest
   power of two of leading rows that covers the occupied slots, so one stream does not pay for 32);
3. **retire**: a slot whose request ended (an EOS id, a stop token sequence, its token budget) or was
   cancelled (a client that went away) is free for the next request at once; until then its cache index
   is held at 0 (it writes nothing valid), so decode reads no more of the cache than the live requests fill.

Device side: pure functions of an :class:`EngineState` (the cache, each slot's last token, PRNG key, draw
count and sampling parameters), jitted with the state donated, so the cache is updated in place. A slot's
draws depend only on its request (prompt, seed, parameters), never on the other slots: the same seed gives
the same answer under any load. Host side: :class:`Engine` (thread-safe ``submit`` / ``cancel``, a
background thread or explicit ``step()`` calls) reports every drawn token to the request's callback.

Multi-turn use (RL episodes, tool results) is a later ``extend``: a slot's cache row already continues from
its own index, so appending tokens to a live row is a prefill that starts at that index.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from ..models.cache import KVCache
from .sampler import prompt_bucket
from .sampling import SamplingParams, sample_rows

MAX_TOP_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's limit)


@struct.dataclass
class EngineState:
    """What the decode step reads and writes, one row per slot.

    Attributes:
      cache: the per-row KV cache (``index``/``lengths`` int32[S]: where each slot writes next).
      token: int32[S] each slot's last drawn token (the next step's input).
      keys: [S] typed PRNG keys, one per request; draw ``d`` uses ``fold_in(key, d)``.
      drawn: int32[S] tokens drawn so far by the slot's request.
      sampling: ``SamplingParams`` of [S] arrays.
    """

    cache: KVCache
    token: jax.Array
    keys: jax.Array
    drawn: jax.Array
    sampling: SamplingParams


@struct.dataclass
class Draw:
    """One token per row: ``token`` int32[R]; ``logprob`` float32[R] under the model's distribution
    (temperature 1, full vocabulary); ``top_ids``/``top_logprobs`` [R, K] the K most likely tokens."""

    token: jax.Array
    logprob: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


def init_state(model: Any, slots: int, max_len: int, *, mesh: Any = None) -> EngineState:
    """Empty slots: a per-row cache of ``slots`` x ``max_len`` and neutral sampling parameters."""
    return EngineState(
        cache=model.init_cache(slots, max_len, mesh=mesh, per_row=True),
        token=jnp.zeros((slots,), jnp.int32),
        keys=jax.random.split(jax.random.key(0), slots),
        drawn=jnp.zeros((slots,), jnp.int32),
        sampling=jax.tree.map(lambda v: jnp.full((slots,), v), SamplingParams.greedy().as_arrays()),
    )


def _draw(keys, logits, sampling: SamplingParams, top: int) -> Draw:
    token, _, model_logp = sample_rows(keys, logits, sampling)
    if top:
        top_logprobs, top_ids = jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32)), top)
    else:
        top_logprobs = jnp.zeros((token.shape[0], 0), jnp.float32)
        top_ids = jnp.zeros((token.shape[0], 0), jnp.int32)
    return Draw(token, model_logp, top_ids.astype(jnp.int32), top_logprobs)


def _rows(tree: Any, start, size: int) -> Any:
    return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, 0), tree)


def prefill(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    layers: tuple[nnx.State, ...],
    state: EngineState,
    slots: jax.Array,
    prompts: jax.Array,
    lengths: jax.Array,
    keys: jax.Array,
    sampling: SamplingParams,
    *,
    top: int = 0,
) -> tuple[EngineState, Draw]:
    """Writes ``prompts`` (int32[k, P], right-padded; ``lengths`` int32[k] real tokens) into the slots
    ``slots`` (int32[k]; a slot out of range, e.g. the slot count, marks a padding row that writes nothing),
    dropping what they held, and draws each request's first token with ``fold_in(keys[i], 0)``."""
    model = nnx.merge(graphdef, params)
    rows, width = prompts.shape
    # The prompts run on a cache of their own width; their keys and values are then scattered into the
    # slots' rows in place. A row's older content is masked (valid = False), and its first decode step
    # writes at ``length``, over the prompt's padding.
    real = jnp.arange(width)[None] < lengths[:, None]
    hidden, fresh = model.forward_hidden(
        prompts, attention_mask=real, cache=model.init_cache(rows, width), layers=layers
    )
    last = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)
    draw = _draw(jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys), model.logits(last)[:, 0], sampling, top)
    cache = state.cache

    def full_rows(x):  # [k, P] -> [k, max_len]: the slots past the prompt's width are zero (not valid)
        return jnp.zeros((rows, cache.max_len), x.dtype).at[:, :width].set(x)

    cache = cache.replace(
        k=tuple(
            k.at[slots, :, :, :width].set(new, mode="drop") for k, new in zip(cache.k, fresh.k, strict=True)
        ),
        v=tuple(
            v.at[slots, :, :width, :].set(new, mode="drop") for v, new in zip(cache.v, fresh.v, strict=True)
        ),
        valid=cache.valid.at[slots].set(full_rows(fresh.valid), mode="drop"),
        positions=cache.positions.at[slots].set(full_rows(fresh.positions), mode="drop"),
        index=cache.index.at[slots].set(lengths, mode="drop"),
        lengths=cache.lengths.at[slots].set(lengths, mode="drop"),
    )
    state = state.replace(
        cache=cache,
        token=state.token.at[slots].set(draw.token, mode="drop"),
        keys=state.keys.at[slots].set(keys, mode="drop"),
        drawn=state.drawn.at[slots].set(1, mode="drop"),
        sampling=jax.tree.map(lambda a, r: a.at[slots].set(r, mode="drop"), state.sampling, sampling),
    )
    return state, draw


def decode(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    layers: tuple[nnx.State, ...],
    state: EngineState,
    active: jax.Array,
    *,
    rows: int,
    top: int = 0,
) -> tuple[EngineState, Draw]:
    """One token for each of the first ``rows`` slots; ``active`` (bool[S]) marks the slots holding a request.

    A free slot, among the leading rows or past them, is held at slot 0 of its row: its index is reset
    there, before and after the step, and its write (the step's token, or the padding of the leading rows'
    writes) is masked (not valid, no length added), overwritten by the next prefill before it is ever read.
    Decode attention reads a row's slots only up to the highest index among the step's rows, so a free slot
    whose index went on growing would make every later step read more of the cache (and run off its end).
    """
    model = nnx.merge(graphdef, params)
    token, drawn = state.token[:rows], state.drawn[:rows]
    cache = state.cache.replace(index=jnp.where(active, state.cache.index, 0))
    # The model continues the cache's leading rows, written in place (slicing the rows out and putting them
    # back made XLA copy the whole cache at every step).
    out = model.forward(token[:, None], attention_mask=active[:rows, None], cache=cache, layers=layers)
    cache = out.cache.replace(index=jnp.where(active, out.cache.index, 0))
    keys = jax.vmap(jax.random.fold_in)(state.keys[:rows], drawn)
    draw = _draw(keys, out.logits[:, -1], _rows(state.sampling, 0, rows), top)
    state = state.replace(
        cache=cache,
        token=state.token.at[:rows].set(draw.token),
        drawn=state.drawn.at[:rows].add(1),
    )
    return state, draw


_prefill = jax.jit(prefill, static_argnums=(0,), static_argnames=("top",), donate_argnames=("state",))
_decode = jax.jit(decode, static_argnums=(0,), static_argnames=("rows", "top"), donate_argnames=("state",))


def decode_params(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, tuple[nnx.State, ...]]:
    """``(graphdef, params, layers)`` for the jitted steps: the blocks' weights sliced per layer once (each
    step would otherwise copy every stacked weight), and their stacked originals left out of ``params``
    (empty placeholders), so the weights are held once."""
    graphdef, params = nnx.split(model)
    layers = model.layer_states()
    flat = nnx.to_flat_state(params)
    params = nnx.from_flat_state(
        [
            (path, v.replace(jnp.zeros((0,), v.get_value().dtype)) if path[0] == "blocks" else v)
            for path, v in flat
        ]
    )
    return graphdef, params, layers


# ------------------------------------------------------------------------------------------------ host


@dataclasses.dataclass(frozen=True)
class Event:
    """A drawn token, reported to the request's callback (``token`` None on an end without a token).

    ``finish_reason``: None while the request goes on, else ``"eos"``, ``"stop"``, ``"length"``,
    ``"cancelled"`` or ``"error"`` (``error`` then says what went wrong).
    """

    token: int | None
    logprob: float = 0.0
    top: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None
    error: str | None = None


@dataclasses.dataclass
class Request:
    """One generation: ``prompt`` token ids, at most ``max_new_tokens`` new ones.

    ``seed`` None draws a fresh one; ``stop_ids`` are token sequences that end the answer (beside the
    engine's EOS ids); ``top_logprobs`` alternatives per token (0..``MAX_TOP_LOGPROBS``).
    ``on_event`` is called from the engine's thread for every token and once with a ``finish_reason``.
    """

    prompt: Sequence[int]
    max_new_tokens: int
    on_event: Callable[[Event], None]
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    seed: int | None = None
    stop_ids: Sequence[Sequence[int]] = ()
    top_logprobs: int = 0
    ignore_eos: bool = False
    # Set by the engine:
    cancelled: bool = False
    generated: list[int] = dataclasses.field(default_factory=list)


class Engine:
    """Serves :class:`Request` s with continuous batching over ``slots`` slots of ``max_len`` tokens.

    Args:
      model: a ``CausalLM`` (``update`` swaps in new parameters).
      slots: concurrent requests; more wait in a queue.
      max_len: tokens per slot (prompt + answer); default the model's ``max_seq_len``.
      eos_ids: ids that end an answer (the tokenizer's EOS and the template's end-of-turn).
      mesh: run under this mesh (the cache sharded over it).
    """

    def __init__(
        self,
        model: nnx.Module,
        *,
        slots: int = 32,
        max_len: int | None = None,
        eos_ids: Sequence[int] = (),
        mesh: Any = None,
    ):
        self.max_len = int(max_len or model.cfg.max_seq_len)
        if not 1 <= self.max_len <= model.cfg.max_seq_len:
            raise ValueError(f"max_len {self.max_len} must be in [1, the model's {model.cfg.max_seq_len}]")
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.slots, self.eos_ids, self.mesh = slots, frozenset(int(e) for e in eos_ids), mesh
        self.graphdef, self.params, self.layers = decode_params(model)
        with self._mesh():
            self.state = init_state(model, slots, self.max_len, mesh=mesh)
        self._queue: deque[Request] = deque()
        self._active: list[Request | None] = [None] * slots
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self.steps = 0  # decode steps run (for tests and benchmarks)

    # -------------------------------------------------------------------------------- public interface

    def update(self, model: nnx.Module) -> None:
        """Generate with ``model``'s parameters from the next step on (same architecture)."""
        with self._lock:
            self.graphdef, self.params, self.layers = decode_params(model)

    def check(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Raises ``ValueError`` when a request of this size cannot be served."""
        if prompt_tokens < 1:
            raise ValueError("the prompt is empty")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if prompt_tokens + max_new_tokens > self.max_len:
            raise ValueError(
                f"the prompt's {prompt_tokens} tokens + max_new_tokens {max_new_tokens} exceed the context of "
                f"{self.max_len} tokens"
            )

    def submit(self, request: Request) -> Request:
        """Queues ``request`` (checked first: ``ValueError`` when it cannot be served); returns it."""
        self.check(len(request.prompt), request.max_new_tokens)
        if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {request.top_logprobs}")
        request.sampling.validate()
        if request.seed is None:
            request.seed = random.SystemRandom().randrange(2**32)
        elif not 0 <= request.seed < 2**32:
            request.seed = int(request.seed) % 2**32  # the key takes 32 bits
        with self._lock:
            self._queue.append(request)
            self._lock.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """Ends ``request`` (a client that went away): its slot is free from the next step on."""
        with self._lock:
            request.cancelled = True
            self._lock.notify_all()

    @property
    def busy_slots(self) -> int:
        with self._lock:
            return sum(r is not None for r in self._active)

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._queue)

    def start(self) -> Engine:
        """Runs the loop in a background thread (``stop`` ends it)."""
        if self._thread is None:
            self._running = True
            self._thread = threading.Thread(target=self._loop, name="jaxrl_llm-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._running = False
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def step(self) -> bool:
        """One scheduler iteration (admit, decode, retire); False when there was nothing to do."""
        self._retire_cancelled()
        admitted = self._admit()
        active = [i for i, r in enumerate(self._active) if r is not None]
        if not active:
            return admitted
        rows = min(prompt_bucket(max(active) + 1, smallest=1), self.slots)
        top = MAX_TOP_LOGPROBS if any(self._active[i].top_logprobs for i in active) else 0
        occupied = np.zeros((self.slots,), bool)
        occupied[active] = True
        with self._mesh():
            self.state, draw = _decode(
                self.graphdef, self.params, self.layers, self.state, jnp.asarray(occupied), rows=rows, top=top
            )
        draw = jax.device_get(draw)
        self.steps += 1
        for i in active:
            self._record(i, draw, i)
        return True

    def generate(self, requests: Sequence[Request]) -> None:
        """Runs ``requests`` to the end on the calling thread (no background loop)."""
        for r in requests:
            self.submit(r)
        while any(self._active) or self._queue:
            self.step()

    # ------------------------------------------------------------------------------------------ internals

    def _mesh(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._running and not self._queue and not any(self._active):
                    self._lock.wait()
                if not self._running:
                    break
            try:
                self.step()
            except Exception as err:  # a failed step ends every request in flight, not the server
                self._fail_all(f"{type(err).__name__}: {err}")

    def _fail_all(self, message: str) -> None:
        with self._lock:
            failed = [r for r in self._active if r is not None] + list(self._queue)
            self._active = [None] * self.slots
            self._queue.clear()
        for r in failed:
            _notify(r, Event(None, finish_reason="error", error=message))

    def _retire_cancelled(self) -> None:
        with self._lock:
            for i, r in enumerate(self._active):
                if r is not None and r.cancelled:
                    self._active[i] = None
                    _notify(r, Event(None, finish_reason="cancelled"))
            kept = deque(r for r in self._queue if not r.cancelled)
            for r in self._queue:
                if r.cancelled:
                    _notify(r, Event(None, finish_reason="cancelled"))
            self._queue = kept

    def _admit(self) -> bool:
        """Prefills waiting requests into free slots, as one batch (padded to a power of two of rows)."""
        with self._lock:
            free = [i for i, r in enumerate(self._active) if r is None]
            batch = []
            while free and self._queue:
                request, slot = self._queue.popleft(), free.pop(0)
                self._active[slot] = request
                batch.append((slot, request))
        if not batch:
            return False
        rows = prompt_bucket(len(batch), smallest=1)
        width = min(prompt_bucket(max(len(r.prompt) for _, r in batch)), self.max_len)
        prompts = np.zeros((rows, width), np.int32)
        lengths = np.ones((rows,), np.int32)
        slots = np.full((rows,), self.slots, np.int32)  # padding rows write nowhere
        seeds = np.zeros((rows,), np.uint32)
        for i, (slot, request) in enumerate(batch):
            prompts[i, : len(request.prompt)] = request.prompt
            lengths[i], slots[i], seeds[i] = len(request.prompt), slot, request.seed
        sampling = [r.sampling for _, r in batch] + [SamplingParams()] * (rows - len(batch))
        sampling = jax.tree.map(lambda *v: np.asarray(v), *sampling).as_arrays()  # [rows] leaves
        top = MAX_TOP_LOGPROBS if any(r.top_logprobs for _, r in batch) else 0
        with self._mesh():
            self.state, draw = _prefill(
                self.graphdef,
                self.params,
                self.layers,
                self.state,
                jnp.asarray(slots),
                jnp.asarray(prompts),
                jnp.asarray(lengths),
                jax.vmap(jax.random.key)(jnp.asarray(seeds)),
                sampling,
                top=top,
            )
        draw = jax.device_get(draw)
        for i, (slot, _) in enumerate(batch):
            self._record(slot, draw, i)
        return True

    def _record(self, slot: int, draw: Draw, row: int) -> None:
        request = self._active[slot]
        token = int(draw.token[row])
        request.generated.append(token)
        top = tuple(
            (int(t), float(lp))
            for t, lp in zip(
                draw.top_ids[row][: request.top_logprobs],
                draw.top_logprobs[row][: request.top_logprobs],
                strict=True,
            )
        )
        reason = self._finish_reason(request, token)
        if reason is not None:
            with self._lock:
                self._active[slot] = None
        _notify(request, Event(token, float(draw.logprob[row]), top, reason))

    def _finish_reason(self, request: Request, token: int) -> str | None:
        if token in self.eos_ids and not request.ignore_eos:
            return "eos"
        generated = request.generated
        for seq in request.stop_ids:
            if len(seq) and generated[-len(seq) :] == list(seq):
                return "stop"
        if len(generated) >= request.max_new_tokens:
            return "length"
        if request.cancelled:
            return "cancelled"
        return None


def _notify(request: Request, event: Event) -> None:
    try:
        request.on_event(event)
    except Exception:  # a callback's failure must not stop the other requests
        request.cancelled = True


__all__ = [
    "Draw",
    "Engine",
    "EngineState",
    "Event",
    "MAX_TOP_LOGPROBS",
    "Request",
    "decode",
    "decode_params",
    "init_state",
    "prefill",
]
