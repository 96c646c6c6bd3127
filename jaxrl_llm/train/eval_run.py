"""One evaluation core for offline evaluation (``python -m jaxrl_llm.eval``) and training (``eval.sets``).

``RecordEvaluator(graphdef, renderer, records, kind, settings, rewards=..., mesh=...)`` is built once (its
programs compile on the first call and are reused); ``evaluator(params) -> EvalResult`` evaluates the model
``nnx.merge(graphdef, params)`` on the records, by their kind:

- ``prompt`` records (and ``conversation`` records ending with an assistant turn, whose text is the
  ground truth): answers generated with the chat template and sampler of training and serving, scored by
  the ``RewardSet`` (the verifiers). ``accuracy``: the share of greedy answers the verifier (the first
  ``math_verify``, ``answer_match`` or ``code_exec`` component, else the first non-model one) gives full
  marks (>= 1); ``reward/<component>`` and ``reward/total``: the greedy answers' mean values (where a
  component applies); ``length_mean`` and ``truncated`` (share cut by ``max_new_tokens``). With
  ``settings.n > 1`` also ``n`` sampled answers at ``settings.temperature``: ``pass_at_<k>`` (unbiased, Chen
  et al. 2021) and ``maj_at_<k>`` (majority vote) for k = 1, 2, 4, ... <= n and n (``eval_metrics``), and
  ``sampled/reward/<component>``.
- ``conversation`` and ``text`` records: ``loss``, the mean token NLL of the SFT objective over the
  target tokens (assistant turns; every token of a text), ``perplexity = exp(loss)`` and ``token_accuracy``.
- ``preference`` records: a score model's pairwise accuracy (``pairwise_accuracy``: score(chosen) >
  score(rejected); ``score_margin``), or for a language model the implicit preference by summed log-prob of
  the answers (``logp_pairwise_accuracy``: log p(chosen) > log p(rejected); ``logp_margin``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxrl_llm.data.packing import pair_buckets
from jaxrl_llm.data.pipeline import make_pipeline
from jaxrl_llm.errors import UserError
from jaxrl_llm.objectives import dpo_objective, rm_objective, sft_objective
from jaxrl_llm.parallel import padded_rows
from jaxrl_llm.render import PairEncoder
from jaxrl_llm.render.records import SFTEncoder
from jaxrl_llm.reward import RewardSet, arrays_for
from jaxrl_llm.rollout import ChatSampler, SamplingParams, conversation, left_pad, prompt_bucket

from .eval_metrics import maj_at_k, pass_at_k, sample_ks, vote_key
from .evaluate import LossEvaluator, prompts_and_answers

VERIFIERS = ("math_verify", "answer_match", "code_exec")  # components that decide correctness, in order
FULL_MARKS = 1.0 - 1e-6


class EvalError(UserError):
    """Records or settings the evaluation cannot use (a kind it has no metric for, prompts too long, ...)."""


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How records are evaluated: ``n`` sampled answers (1: greedy only) at ``temperature``/``top_p``,
    ``max_new_tokens`` each, ending at ``stop`` strings; ``batch_size`` prompts (or packed rows, pairs) a
    program call; ``seq_len`` the packed row length (a pair side's limit); ``examples`` answers kept."""

    n: int = 1
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    batch_size: int = 32
    seq_len: int = 512
    seed: int = 0
    examples: int = 3

    def check(self) -> EvalSettings:
        if self.n < 1 or self.max_new_tokens < 1 or self.batch_size < 1 or self.seq_len < 1:
            raise EvalError(f"n, max_new_tokens, batch_size and seq_len must be >= 1 ({self})")
        if self.n > 1 and self.temperature <= 0:
            raise EvalError(f"n={self.n} samples at temperature {self.temperature} are all the greedy answer")
        try:
            SamplingParams(temperature=self.temperature, top_p=self.top_p).validate()
        except ValueError as err:
            raise EvalError(str(err)) from None
        return self


@dataclasses.dataclass
class EvalResult:
    """Flat ``metrics`` (floats), a few answered ``examples``, and ``notes`` (what a metric means)."""

    metrics: dict[str, float]
    examples: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    notes: dict[str, str] = dataclasses.field(default_factory=dict)


def verifier_of(rewards: RewardSet) -> str | None:
    """The component whose full marks count as correct (module docstring); None with only reward models."""
    keys = [s for s in rewards.specs if s.name in VERIFIERS] or [
        s for s in rewards.specs if s.reward.kind != "model"
    ]
    return keys[0].key if keys else None


def as_prompt_records(records: Sequence[dict], kind: str) -> list[dict]:
    """Prompt records (``prompt``, ``ground_truth``, ``tools``): as they are, or from conversations ending
    with an assistant turn (the turn's text becomes the ground truth)."""
    if kind == "prompt":
        return list(records)
    out = []
    for record, answer in prompts_and_answers(records):
        prompt = {"prompt": record["messages"], "ground_truth": answer}
        out.append(prompt | ({"tools": record["tools"]} if record.get("tools") else {}))
    return out


class RecordEvaluator:
    """Evaluates a model on records of one kind (module docstring); ``__call__(params) -> EvalResult``."""

    def __init__(
        self,
        graphdef: Any,
        renderer: Any,
        records: Sequence[dict],
        kind: str,
        settings: EvalSettings,
        *,
        rewards: RewardSet | None = None,
        mesh: Any,
        head: str = "lm",
    ):
        if not records:
            raise EvalError("no records to evaluate")
        if kind not in ("prompt", "conversation", "text", "preference"):
            raise EvalError(
                f"{kind} records have no evaluation (prompt, conversation, text, preference have)"
            )
        if head == "score" and kind != "preference":
            raise EvalError(f"a score model (reward model) evaluates preference records, not {kind} records")
        self.graphdef, self.renderer, self.kind, self.head = graphdef, renderer, kind, head
        self.settings, self.rewards, self.mesh = settings.check(), rewards, mesh
        self.records = list(records)
        self.prompts = as_prompt_records(self.records, kind) if kind in ("prompt", "conversation") else []
        if kind == "prompt" and rewards is None:
            raise EvalError("prompt records need verifiers (reward functions) to score the answers")
        self.losses = None
        if kind in ("conversation", "text"):
            self.losses = LossEvaluator(graphdef, sft_objective(), mesh)
        elif kind == "preference":
            objective = rm_objective() if head == "score" else dpo_objective(beta=1.0, reference_free=True)
            self.losses = LossEvaluator(graphdef, objective, mesh)

    def __call__(self, params: Any) -> EvalResult:
        result = EvalResult({})
        if self.kind in ("conversation", "text"):
            result.metrics |= self._perplexity(params)
        if self.kind == "preference":
            result.metrics, result.notes = self._preference(params)
        if self.prompts and self.rewards is not None:
            metrics, result.examples, notes = self._generation(params)
            result.metrics |= metrics
            result.notes |= notes
        return result

    # ---------------------------------------------------------------------------------- token losses

    def _batches(self, mode: str):
        s = self.settings
        encoder = SFTEncoder(self.renderer) if mode == "pack" else PairEncoder(self.renderer)
        return make_pipeline(
            self.records,
            encoder,
            batch_size=padded_rows(s.batch_size, self.mesh),
            seq_len=s.seq_len,
            mode=mode,
            buckets=pair_buckets(s.seq_len) if mode == "pairs" else None,
            shuffle=False,
            num_epochs=1,
            worker_count=0,
        )

    def _perplexity(self, params: Any) -> dict[str, float]:
        out = self.losses(params, self._batches("pack"), jax.random.key(self.settings.seed))
        loss = out["loss"]
        return {
            "loss": loss,
            "perplexity": float(np.exp(loss)),
            "token_accuracy": out["token_accuracy"],
            "target_tokens": out["target_tokens"],
        }

    def _preference(self, params: Any) -> tuple[dict[str, float], dict[str, str]]:
        out = self.losses(params, self._batches("pairs"), jax.random.key(self.settings.seed))
        if self.head == "score":
            metrics = {"pairwise_accuracy": out["rewards/accuracies"], "score_margin": out["rewards/margins"]}
            note = "reward model: score(prompt + chosen) > score(prompt + rejected)"
        else:
            metrics = {
                "logp_pairwise_accuracy": out["rewards/accuracies"],
                "logp_margin": out["rewards/margins"],
            }
            note = "language model: summed log p(chosen | prompt) > log p(rejected | prompt)"
        return metrics | {"pairs": out["pairs"]}, {"preference": note}

    # ---------------------------------------------------------------------------------- generation

    def _generation(self, params: Any) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, str]]:
        s, rewards = self.settings, self.rewards
        model = nnx.merge(self.graphdef, params)
        self._check_room(model)
        key = jax.random.key(s.seed)
        greedy = self._sample(model, key, 1, SamplingParams.greedy())
        scored = self._score([c[0] for c in greedy], self.prompts)
        verifier = verifier_of(rewards)
        metrics = _reward_means(scored, "reward")
        lengths = [len(c[0].token_ids) for c in greedy]
        metrics |= {
            "length_mean": float(np.mean(lengths)),
            "truncated": float(np.mean([c[0].finish_reason == "length" for c in greedy])),
            "prompts": float(len(self.prompts)),
        }
        notes, first = {}, {}
        if verifier is not None:
            first["accuracy"] = float(np.mean(_correct(scored, verifier)))
            notes["accuracy"] = f"greedy answers given full marks by {verifier!r}"
        if s.n > 1:
            sampling = SamplingParams(temperature=s.temperature, top_p=s.top_p)
            sampled = self._sample(model, jax.random.fold_in(key, 1), s.n, sampling)
            flat = [c for row in sampled for c in row]
            result = self._score(flat, [p for p in self.prompts for _ in range(s.n)])
            if verifier is not None:
                first |= _k_metrics(flat, _correct(result, verifier), s.n, rewards, verifier)
                notes["pass_at_k"] = f"unbiased estimate from {s.n} samples at temperature {s.temperature:g}"
            metrics |= _reward_means(result, "sampled/reward")
        metrics = first | metrics
        shown = [
            {
                "prompt": _last_user(p),
                "ground_truth": p.get("ground_truth"),
                "greedy": c[0].text,
                **({"score": float(scored.total[i])} if i < len(scored.total) else {}),
            }
            for i, (p, c) in enumerate(zip(self.prompts[: s.examples], greedy, strict=False))
        ]
        return metrics, shown, notes

    def _check_room(self, model: Any) -> None:
        longest = max(
            len(self.renderer.render_prompt(*conversation(p, i))) for i, p in enumerate(self.prompts)
        )
        limit = model.cfg.max_seq_len
        if longest + self.settings.max_new_tokens > limit:
            raise EvalError(
                f"a prompt of {longest} tokens + max_new_tokens={self.settings.max_new_tokens} exceeds the "
                f"model's max_seq_len {limit}: lower max_new_tokens or drop long prompts"
            )

    def _sample(self, model: Any, key: jax.Array, n: int, sampling: SamplingParams):
        batch = padded_rows(max(1, self.settings.batch_size // n), self.mesh)
        chat = ChatSampler(model, self.renderer, batch_size=batch, mesh=self.mesh)
        return chat.generate(
            self.prompts,
            key=key,
            max_new_tokens=self.settings.max_new_tokens,
            n=n,
            sampling=sampling,
            stop=list(self.settings.stop),
        )

    def _score(self, completions: Sequence[Any], records: Sequence[dict]):
        return score_answers(self.rewards, self.renderer, completions, records, self.settings.max_new_tokens)


def score_answers(
    rewards: RewardSet,
    renderer: Any,
    completions: Sequence[Any],
    records: Sequence[dict],
    max_new_tokens: int,
) -> Any:
    """``rewards`` of generated ``completions`` (``rollout.Completion``s, one per record), with the token
    arrays device rewards read when there are any (answers padded to ``max_new_tokens``)."""
    arrays = None
    if any(s.reward.kind == "device" for s in rewards.specs):
        arrays = _device_arrays(renderer, completions, records, max_new_tokens)
    return rewards([c.text for c in completions], records, arrays)


def _correct(result: Any, verifier: str) -> np.ndarray:
    return (result.components[verifier] >= FULL_MARKS) & result.applies[verifier]


def _reward_means(result: Any, prefix: str) -> dict[str, float]:
    out = {}
    for key, values in result.components.items():
        real = values[result.applies[key]]
        if len(real):
            out[f"{prefix}/{key}"] = float(real.mean())
    out[f"{prefix}/total"] = float(result.total.mean())
    return out


def _k_metrics(
    completions, correct: np.ndarray, n: int, rewards: RewardSet, verifier: str
) -> dict[str, float]:
    """pass@k and maj@k averaged over the prompts, whose ``n`` samples are consecutive."""
    name = next(s.name for s in rewards.specs if s.key == verifier)
    keys = [vote_key(c.text, name) for c in completions]
    groups = [(keys[i : i + n], correct[i : i + n]) for i in range(0, len(completions), n)]
    out = {}
    for k in sample_ks(n):
        out[f"pass_at_{k}"] = float(np.mean([pass_at_k(n, int(right.sum()), k) for _, right in groups]))
    for k in sample_ks(n):
        out[f"maj_at_{k}"] = float(np.mean([maj_at_k(votes, right.tolist(), k) for votes, right in groups]))
    return out


def _device_arrays(renderer: Any, completions: Sequence[Any], records: Sequence[dict], width: int):
    """Device-reward inputs of the answers: prompts left-padded, completions padded to ``width``."""
    prompts = [renderer.render_prompt(*conversation(r, i)).tolist() for i, r in enumerate(records)]
    ids, mask = left_pad(prompts, 0, prompt_bucket(max(map(len, prompts))))
    tokens = np.zeros((len(completions), width), np.int32)
    done = np.zeros((len(completions), width), bool)
    for r, c in enumerate(completions):
        tokens[r, : len(c.token_ids)], done[r, : len(c.token_ids)] = c.token_ids, True
    return arrays_for(ids, mask, tokens, done, records, renderer.tokenizer)


def _last_user(record: dict) -> str:
    users = [m.get("content") for m in record.get("prompt") or () if m.get("role") == "user"]
    return str(users[-1]) if users else ""
