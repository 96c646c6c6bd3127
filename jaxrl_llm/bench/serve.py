"""Serving throughput: the continuous-batching engine at 1, 8, 32 concurrent streams against the one-shot
``Sampler`` on the same checkpoint, and the time to first token.

``c`` streams (clients) each send ``waves`` requests one after the other: a stream's next request goes out
when its previous answer has ended. A request is ``prompt_len`` random tokens and makes exactly
``new_tokens`` tokens (no EOS, greedy), or with ``uneven`` a budget drawn from ``[new_tokens // 8,
new_tokens]`` (answers end at different lengths, as real ones do). Tokens/s counts the tokens the requests
asked for, over the wall time until the last one ended.

- The engine streams, and a freed slot takes the stream's next request at once. Its time to first token
  (TTFT) is the mean time from a request's submission to its first token.
- The one-shot sampler serves the same requests wave by wave: the ``c`` requests of a wave as one batch,
  run to the wave's longest budget, the next wave after it. Nothing arrives before a whole batch is done,
  so its TTFT is the mean batch time.

Compilation is excluded from both (one warm-up first). The engine is measured in process (no HTTP): the
server adds its own overhead.
"""

from __future__ import annotations

import statistics
import threading
import time

import jax
import numpy as np

from .forward import _model


def _engine_run(engine, prompts: np.ndarray, budgets: np.ndarray) -> tuple[float, list[float]]:
    """``prompts`` [waves, c, P] and ``budgets`` [waves, c] through the engine, stream ``j`` sending request
    ``(w, j)`` when ``(w - 1, j)`` has ended: (wall seconds, each request's time to first token)."""
    from ..rollout import SamplingParams
    from ..rollout.engine import Request

    waves, streams = budgets.shape
    done = threading.Event()
    ttft: list[float] = []
    finished = [0]
    lock = threading.Lock()

    def send(w: int, j: int) -> None:
        sent = time.perf_counter()
        first = []

        def on_event(event):
            if not first:
                first.append(True)
                with lock:
                    ttft.append(time.perf_counter() - sent)
            if event.finish_reason:
                if w + 1 < waves:
                    send(w + 1, j)  # from the engine's thread: the slot is already free
                with lock:
                    finished[0] += 1
                    if finished[0] == waves * streams:
                        done.set()

        engine.submit(
            Request(
                prompts[w, j].tolist(),
                int(budgets[w, j]),
                on_event=on_event,
                sampling=SamplingParams.greedy(),
                seed=w * streams + j,
                ignore_eos=True,
            )
        )

    start = time.perf_counter()
    for j in range(streams):
        send(0, j)
    if not done.wait(3600):
        raise RuntimeError("the engine did not finish the benchmark's requests within an hour")
    return time.perf_counter() - start, ttft


def _sampler_run(sampler, prompts: np.ndarray, budgets: np.ndarray) -> tuple[float, list[float]]:
    """The same requests wave by wave through the one-shot sampler: (wall seconds, each wave's time)."""
    from ..rollout import SamplingParams

    times = []
    start = time.perf_counter()
    for wave, budget in zip(prompts, budgets, strict=True):
        began = time.perf_counter()
        rollout = sampler.sample(
            wave,
            np.ones_like(wave),
            key=jax.random.key(0),
            max_new_tokens=int(budget.max()),  # one batch runs to its longest answer
            sampling=SamplingParams.greedy(),
        )
        jax.block_until_ready(rollout.tokens)
        times.append(time.perf_counter() - began)
    return time.perf_counter() - start, times


def bench_serve(
    spec: str,
    *,
    streams: tuple[int, ...] = (1, 8, 32),
    prompt_len: int = 64,
    new_tokens: int = 64,
    slots: int | None = None,
    dtype: str = "float32",
    repeats: int = 2,
    waves: int = 1,
    uneven: bool = False,
) -> dict:
    from ..models import count_params
    from ..rollout.engine import Engine
    from ..rollout.sampler import Sampler

    model = _model(spec, dtype)
    cfg = model.cfg
    slots = slots or max(streams)
    max_len = min(cfg.max_seq_len, prompt_len + new_tokens)
    rs = np.random.RandomState(0)
    engine = Engine(model, slots=slots, max_len=max_len).start()
    sampler = Sampler(model, eos_ids=(), pad_id=0)
    result: dict = {
        "model": spec,
        "family": cfg.family,
        "parameters": count_params(model),
        "prompt_len": prompt_len,
        "new_tokens": f"{max(1, new_tokens // 8)}-{new_tokens} (uneven)" if uneven else new_tokens,
        "requests_per_stream": waves,
        "slots": slots,
        "dtype": dtype,
        "device": jax.devices()[0].device_kind,
    }
    try:
        for c in streams:
            prompts = rs.randint(1, cfg.vocab_size, (waves, c, prompt_len)).astype(np.int32)
            budgets = np.full((waves, c), new_tokens)
            if uneven:
                budgets = rs.randint(max(1, new_tokens // 8), new_tokens + 1, (waves, c))
            useful = int(budgets.sum())  # the tokens the requests asked for
            for run, name, runner in ((_engine_run, "engine", engine), (_sampler_run, "sampler", sampler)):
                run(runner, prompts, budgets)  # compiles (prefill and decode buckets, sampler programs)
                rounds = [run(runner, prompts, budgets) for _ in range(repeats)]
                wall = statistics.median(r[0] for r in rounds)
                result[f"{name}_tokens_per_s@{c}"] = useful / wall
                result[f"{name}_ttft_s@{c}"] = statistics.median(statistics.mean(r[1]) for r in rounds)
            result[f"engine/sampler@{c}"] = (
                result[f"engine_tokens_per_s@{c}"] / result[f"sampler_tokens_per_s@{c}"]
            )
    finally:
        engine.stop()
    return result
