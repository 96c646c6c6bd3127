"""A loaded model behind the continuous-batching engine: prompts and settings in, streams of text out.

``Service.load(checkpoint)`` resolves a run or HF directory (``checkpoint.target``), loads the model and the
renderer with the run's chat template, and starts an :class:`~jaxrl_llm.rollout.engine.Engine` whose EOS
ids are the tokenizer's and the template's end-of-turn (``end_of_turn_ids``, as ``ChatSampler``). Then

- ``chat_prompt(messages, tools)`` / ``text_prompt(prompt)``: the prompt's token ids (``render_prompt``, the
  ids training and ``ChatSampler`` see for the same conversation);
- ``settings(prompt_lengths, ...)``: checks a request against the context and returns its :class:`Settings`
  (``APIError`` on a prompt that does not fit, a budget above the context, too many choices);
- ``generate(prompts, settings)``: an async iterator of :class:`Piece` s, one engine request per choice
  (``n`` per prompt, seeds ``seed``, ``seed + 1``, ...), for the HTTP server; ``run(prompt, settings)``: the
  same for one choice as a plain iterator, for the chat CLI.

A :class:`Choice` turns the engine's events for one request into pieces through a ``TextStream`` (stop
strings on the text, incremental detokenization). Engine events arrive on the engine's thread and are handed
to the event loop with ``loop.call_soon_threadsafe`` (an ``asyncio.Queue``). Every exit from ``generate`` (the
end, the per-request timeout, a client that went away: the consumer is cancelled or closes the iterator)
cancels the engine requests still running, so their slots are free at the next step.

Finish reasons (OpenAI's): ``"stop"`` (the end of the turn or a stop string), ``"length"`` (``max_tokens``,
or the per-request timeout: a time budget ends an answer as a token budget does), ``"error"`` (the engine
failed; ``Piece.error`` says why).
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..rollout.engine import Engine, Event, Request
from ..rollout.sampling import SamplingParams
from ..rollout.text import end_of_turn_ids
from .schemas import APIError
from .textstream import TextStream

_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "length", "error": "error"}


@dataclasses.dataclass(frozen=True)
class Settings:
    """One request's generation settings (checked by ``Service.settings``)."""

    max_tokens: int | None  # None: the rest of the context after each prompt
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams.greedy)
    stop: tuple[str, ...] = ()
    n: int = 1
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False


@dataclasses.dataclass
class Piece:
    """What one engine event adds to choice ``index``: ``text`` (often ``""`` while text is held back),
    ``tokens`` ``(id, logprob, ((id, logprob), ...))`` of the ids it consumed (with ``logprobs`` only),
    ``count`` how many generated ids it consumed (usage: an end-of-turn id counts), and on the last piece
    ``finish_reason`` (and ``error``)."""

    index: int
    text: str = ""
    count: int = 0
    tokens: list[tuple[int, float, tuple[tuple[int, float], ...]]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


class Choice:
    """One answer: an engine request and the text stream its tokens go through."""

    def __init__(self, index: int, request: Request, stream: TextStream, logprobs: bool):
        self.index, self.request, self.stream, self.logprobs = index, request, stream, logprobs
        self.finish_reason: str | None = None
        self.engine_done = False

    def feed(self, event: Event) -> Piece | None:
        """The piece ``event`` makes (None once the choice has finished)."""
        self.engine_done = self.engine_done or event.finish_reason is not None
        if self.finish_reason is not None:
            return None
        piece = Piece(self.index)
        if event.token is not None:
            piece.count = 1
            if event.finish_reason != "eos":  # the end-of-turn id is not part of the answer
                piece.text = self.stream.push(event.token)
                if self.logprobs:
                    piece.tokens.append((event.token, event.logprob, event.top))
        if self.stream.stopped is not None:
            piece.finish_reason = "stop"
        elif event.finish_reason is not None:
            piece.text += self.stream.finish()
            piece.finish_reason = _FINISH.get(event.finish_reason, "error")
            if piece.finish_reason == "error":
                piece.error = event.error or "the generation failed"
        self.finish_reason = piece.finish_reason
        return piece

    def expire(self) -> Piece:
        """The last piece of a choice whose time ran out."""
        self.finish_reason = "length"
        return Piece(self.index, self.stream.finish(), finish_reason="length")


class Service:
    """A model, its renderer and the engine (see the module docstring).

    Args:
      model: a ``CausalLM``.
      renderer: the ``Renderer`` the model was trained with.
      name: the model name clients use.
      slots: concurrent requests (choices) the engine decodes together; also the most choices a request
        may ask for.
      max_len: tokens per slot (prompt + answer); default the model's context.
      timeout: seconds a request may take, from its submission to the engine to its last token.
    """

    def __init__(
        self,
        model: Any,
        renderer: Any,
        *,
        name: str,
        slots: int = 32,
        max_len: int | None = None,
        timeout: float = 600.0,
        root: str = "",
    ):
        self.model, self.renderer, self.tokenizer = model, renderer, renderer.tokenizer
        self.name, self.timeout, self.root, self.created = name, float(timeout), root, int(time.time())
        self.engine = Engine(model, slots=slots, max_len=max_len, eos_ids=end_of_turn_ids(renderer))
        self.slots, self.max_len = self.engine.slots, self.engine.max_len
        self.vocab = int(model.cfg.vocab_size)

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        *,
        dtype: str = "float32",
        name: str | None = None,
        slots: int = 32,
        max_len: int | None = None,
        timeout: float = 600.0,
    ) -> Service:
        """From a run directory or an HF checkpoint directory (``UserError`` when it is neither)."""
        import jax.numpy as jnp

        from ..checkpoint.target import resolve_target, target_renderer
        from ..models import load_hf

        target = resolve_target(checkpoint)
        renderer = target_renderer(target)
        model = load_hf(target.model_dir, dtype=getattr(jnp, dtype))
        renderer.tokenizer.check_fits(model.cfg.vocab_size)
        if max_len is not None and not 1 <= max_len <= model.cfg.max_seq_len:
            raise UserError(
                f"--max-len {max_len}: must be in [1, the model's context {model.cfg.max_seq_len}]"
            )
        name = name or Path(checkpoint).resolve().name
        return cls(
            model, renderer, name=name, slots=slots, max_len=max_len, timeout=timeout, root=str(checkpoint)
        )

    def start(self, *, warmup: bool = True) -> Service:
        """Starts the engine's thread; ``warmup`` compiles a short prompt's prefill and one decode step."""
        self.engine.start()
        if warmup:
            prompt = self.chat_prompt([{"role": "user", "content": "Hi"}])
            for _ in self.run(prompt, Settings(max_tokens=2, ignore_eos=True)):
                pass
        return self

    def stop(self) -> None:
        self.engine.stop()

    # ---------------------------------------------------------------------------------------- prompts

    def chat_prompt(self, messages: Sequence[dict[str, Any]], tools: Any = None) -> list[int]:
        """The ids the model is prompted with for ``messages`` (canonical) and ``tools``."""
        try:
            return self.renderer.render_prompt(messages, tools).tolist()
        except UserError as err:  # RenderError: the template cannot render this conversation
            raise APIError(str(err), param="messages") from None

    def text_prompt(self, prompt: str | Sequence[int], param: str = "prompt") -> list[int]:
        """A raw prompt's ids: a string encoded as it is (no BOS added: templates write it), or ids."""
        if isinstance(prompt, str):
            return self.renderer.encode(prompt).tolist()
        bad = next((t for t in prompt if not 0 <= t < self.vocab), None)
        if bad is not None:
            raise APIError(f"token id {bad} is outside the vocabulary [0, {self.vocab})", param=param)
        return list(prompt)

    def settings(
        self,
        prompt_lengths: Sequence[int],
        max_tokens: int | None,
        *,
        prompt_param: str = "messages",
        **kwargs: Any,
    ) -> Settings:
        """Checks ``prompt_lengths`` (one per prompt) and the budget against the context, and ``n`` per
        prompt against the slots; ``kwargs`` are the other :class:`Settings`. Raises ``APIError``
        (``prompt_param`` names the prompt's field)."""
        settings = Settings(max_tokens=max_tokens, **kwargs)
        choices = settings.n * len(prompt_lengths)
        if choices > self.slots:
            raise APIError(
                f"n = {settings.n} x {len(prompt_lengths)} prompt(s) asks for {choices} answers; this server "
                f"makes at most {self.slots} per request (--max-batch)",
                param="n",
            )
        for length in prompt_lengths:
            if length < 1:
                raise APIError("the prompt is empty", param=prompt_param)
            if length >= self.max_len:
                raise APIError(
                    f"the prompt has {length} tokens; the context is {self.max_len} tokens (prompt + answer)",
                    param=prompt_param,
                    code="context_length_exceeded",
                )
            if max_tokens is not None and length + max_tokens > self.max_len:
                raise APIError(
                    f"max_tokens {max_tokens} + the prompt's {length} tokens exceed the context of "
                    f"{self.max_len} tokens",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
        try:
            settings.sampling.validate()
        except ValueError as err:
            raise APIError(str(err)) from None
        return settings

    # -------------------------------------------------------------------------------------- generation

    def _choices(
        self, prompts: Sequence[list[int]], settings: Settings, post: Callable[[int, Event], None]
    ) -> list[Choice]:
        choices = []
        for p, prompt in enumerate(prompts):
            for j in range(settings.n):
                index = p * settings.n + j
                seed = None if settings.seed is None else (settings.seed + index) % 2**32
                request = Request(
                    prompt,
                    settings.max_tokens or self.max_len - len(prompt),
                    on_event=lambda event, index=index: post(index, event),
                    sampling=settings.sampling,
                    seed=seed,
                    top_logprobs=settings.top_logprobs if settings.logprobs else 0,
                    ignore_eos=settings.ignore_eos,
                )
                stream = TextStream(self.tokenizer, settings.stop)
                choices.append(Choice(index, request, stream, settings.logprobs))
        return choices

    def _submit(self, choices: list[Choice]) -> None:
        try:
            for choice in choices:
                self.engine.submit(choice.request)
        except ValueError as err:  # checked by settings() already; an engine limit it does not know
            self._cancel(choices)
            raise APIError(str(err)) from None

    def _cancel(self, choices: list[Choice]) -> None:
        for choice in choices:
            if not choice.engine_done:
                self.engine.cancel(choice.request)

    def _piece(self, choice: Choice, event: Event) -> Piece | None:
        piece = choice.feed(event)
        if piece is not None and piece.finish_reason == "stop" and not choice.engine_done:
            self.engine.cancel(choice.request)  # a stop string: the slot is free at the next step
        return piece

    async def generate(self, prompts: Sequence[list[int]], settings: Settings) -> AsyncIterator[Piece]:
        """Pieces of every choice (``n`` per prompt; choice ``p * n + j``) as they are generated."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        def post(index: int, event: Event) -> None:  # on the engine's thread
            loop.call_soon_threadsafe(events.put_nowait, (index, event))

        choices = self._choices(prompts, settings, post)
        deadline = loop.time() + self.timeout
        self._submit(choices)
        try:
            while any(c.finish_reason is None for c in choices):
                try:
                    index, event = await asyncio.wait_for(events.get(), max(deadline - loop.time(), 0))
                except TimeoutError:
                    for c in choices:
                        if c.finish_reason is None:
                            yield c.expire()
                    break
                piece = self._piece(choices[index], event)
                if piece is not None:
                    yield piece
        finally:
            self._cancel(choices)

    def run(self, prompt: list[int], settings: Settings) -> Iterator[Piece]:
        """The pieces of one answer, on the calling thread (the chat CLI; ``n`` is ignored)."""
        events: queue.Queue[Event] = queue.Queue()
        (choice,) = self._choices([prompt], dataclasses.replace(settings, n=1), lambda i, e: events.put(e))
        deadline = time.monotonic() + self.timeout
        self._submit([choice])
        try:
            while choice.finish_reason is None:
                try:
                    event = events.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    yield choice.expire()
                    break
                piece = self._piece(choice, event)
                if piece is not None:
                    yield piece
        finally:
            self._cancel([choice])
