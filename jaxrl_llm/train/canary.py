"""The online canary: a fixed set of prompts answered every ``canary.every`` steps, watched by rules.

Every canary pass answers each prompt greedily with the current policy (the same chat template and sampler
as evaluation and serving), scores the answers (``canary.reward``, else the run's ``reward.functions``, else
whitespace-stripped exact match with the record's ``ground_truth``), and measures on the answer tokens the
policy's mean entropy and, with a reference model, the mean KL(policy || reference) over the whole
vocabulary. The loop logs these under ``canary/...``, the answers as TensorBoard text and in
``canary.jsonl``, then applies the rules; the first that fires halts the run or rolls it back
(``canary.action``):

- ``canary.min_score``: the score fell below a floor;
- ``canary.max_drop``: the score fell more than this below its best so far (the baseline at step 0 counts);
- ``canary.max_kl``: the KL to the reference rose above a ceiling;
- ``canary.min_entropy``: the entropy collapsed below a floor;
- ``canary.min_length``: the mean answer length (tokens) collapsed below a floor.

The pass at step 0 only sets the baseline (no rule applies to the model the run starts from).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_llm.errors import UserError

from .eval_run import score_answers
from .state import Frozen, TrainState

CANARY_FILE = "canary.jsonl"
RULES = ("min_score", "max_drop", "max_kl", "min_entropy", "min_length")


class CanaryError(UserError):
    """Canary prompts that cannot be used (a missing file, a record without a prompt)."""


class CanaryHalted(UserError):
    """A canary rule fired and ``canary.action=halt`` (or no rollback was possible)."""


@dataclasses.dataclass(frozen=True)
class CanaryConfig:
    """The ``canary.*`` keys (see ``python -m jaxrl_llm.config``)."""

    every: int = 0
    prompts: tuple[dict[str, Any], ...] = ()
    max_new_tokens: int = 32
    reward: tuple[dict[str, Any], ...] = ()
    action: str = "halt"
    min_score: float | None = None
    max_drop: float | None = None
    max_kl: float | None = None
    min_entropy: float | None = None
    min_length: float | None = None

    @property
    def enabled(self) -> bool:
        return self.every > 0 and bool(self.prompts)

    @classmethod
    def from_config(cls, cfg: Any) -> CanaryConfig:
        c = cfg.canary
        records = [prompt_record(p, f"canary.prompts[{i}]") for i, p in enumerate(c.prompts or ())]
        if c.path:
            records += read_prompts(c.path)
        if c.every and not records:
            raise CanaryError(
                "canary.every is set but there are no canary prompts: set canary.prompts or canary.path"
            )
        return cls(
            every=int(c.every),
            prompts=tuple(records),
            max_new_tokens=int(c.max_new_tokens),
            reward=tuple(c.reward or ()),
            action=str(c.action),
            **{rule: None if c[rule] is None else float(c[rule]) for rule in RULES},
        )


def prompt_record(value: Any, where: str) -> dict[str, Any]:
    """A canary prompt: a string (one user message), a message list, or a record with ``prompt`` (string or
    messages) and optionally ``ground_truth``; returned as ``{"prompt": [messages], "ground_truth"?}``."""
    if isinstance(value, str):
        value = {"prompt": value}
    elif isinstance(value, list):
        value = {"prompt": value}
    if not isinstance(value, dict) or "prompt" not in value:
        raise CanaryError(
            f"{where}: expected a string, a message list or a record with 'prompt', got {value!r:.80}"
        )
    prompt = value["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not (isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m for m in prompt)):
        raise CanaryError(f"{where}: 'prompt' must be a string or a list of messages with a role")
    out = {"prompt": prompt}
    if value.get("ground_truth") is not None:
        out["ground_truth"] = str(value["ground_truth"])
    return out


def read_prompts(path: str) -> list[dict[str, Any]]:
    """Canary prompts from a JSON Lines file (one prompt record a line)."""
    file = Path(path)
    if not file.is_file():
        raise CanaryError(f"canary.path={path!r}: no such file")
    out = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise CanaryError(f"{path}:{n}: not valid JSON ({err.msg})") from err
        out.append(prompt_record(value, f"{path}:{n}"))
    if not out:
        raise CanaryError(f"canary.path={path!r}: the file holds no prompts")
    return out


@dataclasses.dataclass
class CanaryReport:
    """One canary pass: its metrics, the answers, and the rule that fired (None when all held)."""

    step: int
    metrics: dict[str, float]
    samples: list[dict[str, Any]]
    fired: str | None = None


def _stats_fn(graphdef: nnx.GraphDef, policy: Callable[[Any], Any], reference: str | None):
    """Jitted ``(params, frozen, tokens, answer) -> (entropy, kl)``: means over the answer positions."""

    def stats(params, frozen: Frozen, tokens, answer):
        real = tokens >= 0
        ids = jnp.where(real, tokens, 0)
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        segments = real.astype(jnp.int32)
        logits = policy(nnx.merge(graphdef, params))(ids, positions=positions, segment_ids=segments)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        weight = answer[:, 1:].astype(jnp.float32)  # logits at t predict token t + 1
        count = jnp.maximum(weight.sum(), 1.0)
        entropy = (-(jnp.exp(logp) * logp).sum(-1) * weight).sum() / count
        kl = jnp.float32(jnp.nan)
        if reference is not None:
            ref = frozen.bind(params).models()[reference](ids, positions=positions, segment_ids=segments)
            ref_logp = jax.nn.log_softmax(ref[:, :-1].astype(jnp.float32), axis=-1)
            kl = ((jnp.exp(logp) * (logp - ref_logp)).sum(-1) * weight).sum() / count
        return entropy, kl

    return jax.jit(stats)


class Canary:
    """Answers the canary prompts with a state's policy and judges the answers (see the module docstring)."""

    def __init__(
        self,
        cfg: CanaryConfig,
        *,
        graphdef: nnx.GraphDef,
        renderer: Any,
        mesh: Any,
        frozen: Frozen,
        policy: Callable[[Any], Any] = lambda model: model,
        rewards: Any = None,
    ):
        self.cfg, self.graphdef, self.renderer, self.mesh = cfg, graphdef, renderer, mesh
        self.frozen, self.policy, self.rewards = frozen, policy, rewards
        self.reference = "reference" if "reference" in frozen.names else None
        self.best: float | None = None
        self._stats = _stats_fn(graphdef, policy, self.reference)
        self._prompt_ids = [renderer.render_prompt(r["prompt"]) for r in cfg.prompts]  # fixed prompts

    def _answers(self, model: Any) -> list[Any]:
        from jaxrl_llm.rollout import ChatSampler, SamplingParams

        # The sampler's programs are compiled once per shape for the process (a new wrapper costs nothing).
        chat = ChatSampler(model, self.renderer, batch_size=len(self.cfg.prompts), mesh=self.mesh)
        out = chat.generate(
            [r["prompt"] for r in self.cfg.prompts],
            key=jax.random.key(0),
            max_new_tokens=self.cfg.max_new_tokens,
            sampling=SamplingParams.greedy(),
        )
        return [c for (c,) in out]

    def _scores(self, completions: list[Any]) -> np.ndarray | None:
        records = list(self.cfg.prompts)
        if self.rewards is not None and self.rewards.specs:
            result = score_answers(self.rewards, self.renderer, completions, records, self.cfg.max_new_tokens)
            return np.asarray(result.total)
        if all("ground_truth" in r for r in records):
            return np.asarray(
                [
                    c.text.strip() == r["ground_truth"].strip()
                    for c, r in zip(completions, records, strict=True)
                ],
                np.float32,
            )
        return None

    def __call__(self, state: TrainState, step: int) -> CanaryReport:
        model = self.policy(nnx.merge(self.graphdef, state.params))
        completions = self._answers(model)
        prompts = self._prompt_ids
        rows = [
            np.concatenate([p, np.asarray(c.token_ids, np.int64)])
            for p, c in zip(prompts, completions, strict=True)
        ]
        width = max(map(len, rows))
        tokens = np.full((len(rows), width), -1, np.int32)
        answer = np.zeros((len(rows), width), bool)
        for i, (row, p) in enumerate(zip(rows, prompts, strict=True)):
            tokens[i, : len(row)] = row
            answer[i, len(p) : len(row)] = True
        with jax.set_mesh(self.mesh):
            entropy, kl = jax.device_get(self._stats(state.params, self.frozen, tokens, answer))
        metrics = {
            "entropy": float(entropy),
            "length": float(np.mean([len(c.token_ids) for c in completions])),
        }
        if self.reference is not None:
            metrics["kl"] = float(kl)
        scores = self._scores(completions)
        if scores is not None:
            metrics["score"] = float(scores.mean())
        samples = [
            {
                "prompt": r["prompt"][-1].get("content", ""),
                "answer": c.text,
                **({"ground_truth": r["ground_truth"]} if "ground_truth" in r else {}),
                **({"score": float(scores[i])} if scores is not None else {}),
            }
            for i, (r, c) in enumerate(zip(self.cfg.prompts, completions, strict=True))
        ]
        fired = None if step == 0 else self.judge(metrics)
        if "score" in metrics and fired is None:
            self.best = metrics["score"] if self.best is None else max(self.best, metrics["score"])
        if self.best is not None:
            metrics["best_score"] = self.best
        return CanaryReport(step, metrics, samples, fired)

    def judge(self, m: dict[str, float]) -> str | None:
        """The first rule that fires on metrics ``m``, in words; None when all hold."""
        c = self.cfg
        score = m.get("score")
        if c.min_score is not None and score is not None and score < c.min_score:
            return f"canary score {score:.4g} < canary.min_score={c.min_score:g}"
        if (
            c.max_drop is not None
            and score is not None
            and self.best is not None
            and self.best - score > c.max_drop
        ):
            return (
                f"canary score {score:.4g} is {self.best - score:.4g} below its best {self.best:.4g} "
                f"(> canary.max_drop={c.max_drop:g})"
            )
        if c.max_kl is not None and "kl" in m and not m["kl"] <= c.max_kl:
            return f"KL to the reference {m['kl']:.4g} > canary.max_kl={c.max_kl:g}"
        if c.min_entropy is not None and not m["entropy"] >= c.min_entropy:
            return f"canary entropy {m['entropy']:.4g} < canary.min_entropy={c.min_entropy:g}"
        if c.min_length is not None and m["length"] < c.min_length:
            return f"canary answer length {m['length']:.4g} tokens < canary.min_length={c.min_length:g}"
        return None


def format_samples(report: CanaryReport) -> str:
    """The answers as a Markdown table (TensorBoard renders text summaries as Markdown)."""
    lines = ["| prompt | answer | ground truth | score |", "|---|---|---|---|"]
    for s in report.samples:
        cells = [
            s["prompt"],
            s["answer"],
            s.get("ground_truth", ""),
            f"{s['score']:.3g}" if "score" in s else "",
        ]
        lines.append("| " + " | ".join(str(x).replace("|", "\\|").replace("\n", " ") for x in cells) + " |")
    return "\n".join(lines)


def canary_for_stage(
    cfg: Any, run: Any, graphdef: nnx.GraphDef, frozen: Frozen, policy: Callable[[Any], Any], initial: Any
) -> Canary | None:
    """The run's canary from ``cfg.canary`` (None when ``canary.every`` is 0). ``frozen`` is the stage's;
    with ``canary.max_kl`` and no reference among them, ``initial`` (the initial policy's ``(graphdef,
    state)``) is copied to be the canary's reference."""
    c = CanaryConfig.from_config(cfg)
    if not c.enabled:
        return None
    if jax.process_count() > 1:  # its rules halt or roll back: every process would have to decide alike
        raise UserError(
            f"canary.every={c.every}: the canary runs in single-process runs only for now; set canary.every=0 "
            "for a multi-process run"
        )
    if c.max_kl is not None and "reference" not in frozen.names:
        from jaxrl_llm.parallel import frozen_copy

        ref_graphdef, ref_state = initial
        frozen = Frozen(
            states={"reference": frozen_copy(ref_state)}, graphdefs=(("reference", ref_graphdef),)
        )
    rewards = None
    specs: Sequence[Any] = c.reward or tuple(cfg.reward.functions)
    if specs:
        from jaxrl_llm.reward import RewardSet

        rewards = RewardSet(
            list(specs),
            tokenizer=run.tokenizer,
            on_error=cfg.reward.on_error,
            host_timeout_s=cfg.reward.host_timeout_s,
            workers=cfg.reward.workers,
        )
    return Canary(
        c,
        graphdef=graphdef,
        renderer=run.renderer,
        mesh=run.mesh,
        frozen=frozen,
        policy=policy,
        rewards=rewards,
    )
