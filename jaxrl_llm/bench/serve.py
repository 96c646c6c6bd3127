"""Serving throughput: the continuous-batching engine at 1, 8, 32 concurrent streams against the one-shot
``Sampler`` on the same checkpoint, and the time to first token.

For each concurrency ``c``: ``c`` requests of ``prompt_len`` random tokens arrive at once and each makes
exactly ``new_tokens`` tokens (no EOS, greedy). The engine streams: its time to first token (TTFT) is the
mean time from submission to a request's first token, and its tokens/s is ``c * new_tokens`` over the wall
time until the last request ends. The one-shot sampler generates the same ``c`` rows as one batch; nothing
arrives before the whole batch is done, so its TTFT is that time. Compilation is excluded from both (one
warm-up round first). The engine is measured in process (no HTTP): the server adds its own overhead.
"""

from __future__ import annotations

import statistics
import threading
import time

import jax
import numpy as np

from .forward import _model


def _engine_round(engine, prompts: np.ndarray, new_tokens: int) -> tuple[float, list[float]]:
    """(wall seconds until every request ended, each request's time to first token)."""
    from ..rollout import SamplingParams
    from ..rollout.engine import Request

    done = threading.Event()
    first: dict[int, float] = {}
    ended: list[int] = []
    lock = threading.Lock()
    start = time.perf_counter()

    def on_event(event, i):
        with lock:
            first.setdefault(i, time.perf_counter() - start)
            if event.finish_reason:
                ended.append(i)
                if len(ended) == len(prompts):
                    done.set()

    for i, prompt in enumerate(prompts):
        engine.submit(
            Request(
                prompt.tolist(),
                new_tokens,
                on_event=lambda e, i=i: on_event(e, i),
                sampling=SamplingParams.greedy(),
                seed=i,
                ignore_eos=True,
            )
        )
    if not done.wait(3600):
        raise RuntimeError("the engine did not finish the benchmark's requests within an hour")
    return time.perf_counter() - start, [first[i] for i in range(len(prompts))]


def bench_serve(
    spec: str,
    *,
    streams: tuple[int, ...] = (1, 8, 32),
    prompt_len: int = 64,
    new_tokens: int = 64,
    slots: int | None = None,
    dtype: str = "float32",
    repeats: int = 2,
) -> dict:
    from ..models import count_params
    from ..rollout import SamplingParams
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
        "new_tokens": new_tokens,
        "slots": slots,
        "dtype": dtype,
        "device": jax.devices()[0].device_kind,
    }
    try:
        for c in streams:
            prompts = rs.randint(1, cfg.vocab_size, (c, prompt_len)).astype(np.int32)
            _engine_round(engine, prompts, new_tokens)  # compiles the prefill and the decode row buckets
            rounds = [_engine_round(engine, prompts, new_tokens) for _ in range(repeats)]
            wall = statistics.median(r[0] for r in rounds)
            ttft = statistics.median(statistics.mean(r[1]) for r in rounds)

            def one_shot(prompts=prompts):
                return sampler.sample(
                    prompts,
                    np.ones_like(prompts),
                    key=jax.random.key(0),
                    max_new_tokens=new_tokens,
                    sampling=SamplingParams.greedy(),
                ).tokens

            jax.block_until_ready(one_shot())
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(one_shot())
                times.append(time.perf_counter() - start)
            batch_s = statistics.median(times)
            result[f"engine_tokens_per_s@{c}"] = c * new_tokens / wall
            result[f"engine_ttft_s@{c}"] = ttft
            result[f"sampler_tokens_per_s@{c}"] = c * new_tokens / batch_s
            result[f"sampler_ttft_s@{c}"] = batch_s
            result[f"engine/sampler@{c}"] = batch_s / wall
    finally:
        engine.stop()
    return result
