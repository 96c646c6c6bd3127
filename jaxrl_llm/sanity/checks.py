"""The checks of ``python -m jaxrl_llm.sanity``: a checkpoint in HF transformers (PyTorch, CPU, float32)
against this project's model on the same prompts.

For a language model: the declared stop ids (``generation_config.json``, else ``config.json``) hold every
id our sampler stops at (``end_of_turn_ids``); the logits of each rendered prompt agree within ``atol``; HF
``generate`` (greedy, the checkpoint's own generation config) produces our ``ChatSampler``'s greedy
continuation token for token and stops where it stops. For a reward model (``*ForSequenceClassification``):
a pad id is declared, each sequence's score agrees alone and in a right-padded batch of sequences of
different lengths (the way ``AutoModelForSequenceClassification`` is used, and what it refuses without a
pad id). Each check is a :class:`Check`; ``verdict`` is ``pass``, ``warn`` (worth reading, not a defect:
a near tie in the greedy argmax, no pad id on a language model) or ``FAIL``.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from jaxrl_llm.errors import UserError

# Generic chat prompts of different lengths, for a checkpoint whose run names no canary prompts.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "What is 12 + 30?",
    "Hi! Who are you?",
    "Name three colours.",
    "Write one sentence about the sea, please.",
)
# Answers scored after the prompts by a reward model's checks (a prompt's ground truth when it has one).
DEFAULT_ANSWERS: tuple[str, ...] = ("42", "A model.", "Red, green and blue.", "The sea is wide and deep.")
# Float32 logits of the same weights in two implementations differ by accumulated rounding (~1e-5 for
# tiny models, more with depth and width); a wrong conversion differs by O(1).
DEFAULT_ATOL = 1e-3
TORCH_INSTALL = "pip install torch==2.13.0 (or pip install -e '.[test]')"


class SanityError(UserError):
    """A target, prompt file or setting that cannot be checked (a user error: exit 2)."""


@dataclasses.dataclass
class Check:
    """One row of the table.

    Attributes:
      name: what was checked (``greedy p1``: prompt 1's greedy continuation).
      verdict: ``"pass"``, ``"warn"`` or ``"FAIL"``.
      max_delta: max |Δlogit| (|Δscore| for a reward model) between HF and ours; None where not compared.
      diverge: the first token where HF and ours differ: ``"index: ours vs HF"``; None where they agree.
      note: why it failed, or what it saw.
    """

    name: str
    verdict: str
    max_delta: float | None = None
    diverge: str | None = None
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.verdict == "FAIL"


@dataclasses.dataclass(frozen=True)
class Settings:
    """What ``run_checks`` compares: ``prompts`` (prompt records, as the canary's; None: the run's canary
    prompts, else ``DEFAULT_PROMPTS``), the greedy budget, the logit tolerance and the chat template (None:
    the run's recorded one, else the tokenizer's)."""

    prompts: tuple[dict[str, Any], ...] | None = None
    max_new_tokens: int = 32
    atol: float = DEFAULT_ATOL
    template: str | None = None


@dataclasses.dataclass
class Report:
    target: str
    model_dir: str
    head: str
    template: str
    prompts: int
    settings: dict[str, Any]
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return not any(c.failed for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "model_dir": self.model_dir,
            "head": self.head,
            "template": self.template,
            "prompts": self.prompts,
            "settings": self.settings,
            "passed": self.passed,
            "checks": [dataclasses.asdict(c) for c in self.checks],
        }


def import_torch() -> tuple[Any, Any]:
    """``(torch, transformers)``; a ``SanityError`` naming the install command when PyTorch is missing (it is
    a test extra, never a runtime dependency)."""
    try:
        import torch
        import transformers
    except ImportError as err:
        raise SanityError(
            f"the sanity check runs HF transformers on PyTorch, which is not installed ({err}): {TORCH_INSTALL}"
        ) from None
    return torch, transformers


def run_prompts(target: Any) -> tuple[dict[str, Any], ...]:
    """The run's canary prompts (``canary.prompts`` and the file ``canary.path``), else ``DEFAULT_PROMPTS``."""
    from jaxrl_llm.train.canary import prompt_record, read_prompts

    canary = target.run_config.get("canary") or {}
    records = [prompt_record(p, f"canary.prompts[{i}]") for i, p in enumerate(canary.get("prompts") or ())]
    path = canary.get("path") or ""
    if path and Path(path).is_file():
        records += read_prompts(path)
    return tuple(records) or tuple(prompt_record(p, "default prompt") for p in DEFAULT_PROMPTS)


def read_prompt_file(path: str | os.PathLike) -> tuple[dict[str, Any], ...]:
    """``--prompts FILE``: JSON Lines of prompt records (a string, a message list or ``{prompt, ...}``)."""
    from jaxrl_llm.train.canary import read_prompts

    if not Path(path).is_file():
        raise SanityError(f"--prompts {path}: no such file")
    return tuple(read_prompts(str(path)))


def run_checks(path: str | os.PathLike, settings: Settings = Settings()) -> Report:
    """Loads ``path`` (an HF checkpoint or a run directory) in HF transformers and here, and compares them."""
    if settings.max_new_tokens < 1:
        raise SanityError(f"--max-new-tokens must be >= 1, got {settings.max_new_tokens}")
    if not settings.atol > 0:
        raise SanityError(f"--atol must be > 0, got {settings.atol}")
    torch, transformers = import_torch()
    import jax

    from jaxrl_llm.checkpoint.target import resolve_target, target_renderer
    from jaxrl_llm.models import load_hf

    target = resolve_target(path)
    renderer = target_renderer(target, settings.template)
    prompts = settings.prompts if settings.prompts is not None else run_prompts(target)
    ours = load_hf(target.model_dir)  # float32; the checkpoint's own head
    head = "score" if getattr(ours, "score", None) is not None else "lm"
    transformers.logging.set_verbosity_error()  # HF's advice on generation flags is not this tool's output
    transformers.logging.disable_progress_bar()
    auto = (
        transformers.AutoModelForSequenceClassification
        if head == "score"
        else transformers.AutoModelForCausalLM
    )
    checks: list[Check] = []
    try:
        theirs = auto.from_pretrained(
            str(target.model_dir), dtype=torch.float32, attn_implementation="eager"
        ).eval()
    except Exception as err:  # noqa: BLE001 - whatever HF refuses, the checkpoint fails the check
        checks.append(Check("HF load", "FAIL", note=f"{auto.__name__}: {type(err).__name__}: {_line(err)}"))
        theirs = None
    if theirs is not None:
        with jax.default_matmul_precision("highest"), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if head == "score":
                conversations = score_conversations(prompts)
                checks.append(_template_check(target.model_dir, renderer, conversations, False, transformers))
                checks += _score_checks(ours, theirs, renderer, conversations, settings, torch)
            else:
                conversations = [p["prompt"] for p in prompts]
                checks.append(_template_check(target.model_dir, renderer, conversations, True, transformers))
                checks += _lm_checks(ours, theirs, renderer, prompts, settings, torch)
    return Report(
        target=str(path),
        model_dir=str(target.model_dir),
        head=head,
        template=renderer.template_name,
        prompts=len(prompts),
        settings={"max_new_tokens": settings.max_new_tokens, "atol": settings.atol},
        checks=checks,
    )


def _line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def _short(text: str, limit: int = 48) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list | tuple) else [value])]


def _token(renderer: Any, token_id: int | None) -> str:
    return "<end>" if token_id is None else repr(renderer.tokenizer.decode([token_id]))


def _first_difference(
    ours: list[int], hf: list[int], renderer: Any
) -> tuple[int, int | None, int | None, str]:
    """Where two id lists first differ: ``(index, our id, HF's id, "index: ours vs HF")`` (an id is None
    where its list has already ended)."""
    k = next((j for j, (a, b) in enumerate(zip(ours, hf, strict=False)) if a != b), min(len(ours), len(hf)))
    a = ours[k] if k < len(ours) else None
    b = hf[k] if k < len(hf) else None
    return k, a, b, f"{k}: {_token(renderer, a)} vs {_token(renderer, b)}"


def _template_check(model_dir, renderer, conversations, generation_prompt: bool, transformers) -> Check:
    """HF's own ``apply_chat_template`` on the checkpoint's tokenizer gives the ids we render (with the run's
    template): an HF user prompts the model as training did."""
    name = "chat template"
    try:
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
        for i, messages in enumerate(conversations):
            text = hf_tok.apply_chat_template(
                list(messages), add_generation_prompt=generation_prompt, tokenize=False
            )
            got = hf_tok(text, add_special_tokens=False)["input_ids"]
            want = (
                renderer.render_prompt(messages) if generation_prompt else renderer.render_ids(messages)
            ).tolist()
            if got != want:
                return Check(
                    name,
                    "FAIL",
                    diverge=_first_difference(want, got, renderer)[3],
                    note=f"HF apply_chat_template renders prompt {i} unlike the {renderer.template_name} "
                    "template the model was trained with",
                )
    except Exception as err:  # noqa: BLE001 - a tokenizer or template HF cannot use fails the check
        return Check(name, "FAIL", note=f"HF tokenizer: {type(err).__name__}: {_line(err)}")
    return Check(name, "pass", note=f"HF apply_chat_template gives our {renderer.template_name} prompt ids")


# ---------------------------------------------------------------------------------------- language model


def _stop_check(theirs: Any, renderer: Any) -> Check:
    from jaxrl_llm.rollout.text import end_of_turn_ids

    declared = _ids(theirs.generation_config.eos_token_id)
    wanted = list(end_of_turn_ids(renderer))
    shown = ", ".join(f"{i} {_token(renderer, i)}" for i in declared)
    if not declared:
        return Check(
            "stop ids",
            "FAIL",
            note="config.json has no eos_token_id: HF generate will not stop at the end of the turn "
            f"(ours stops at {', '.join(f'{i} {_token(renderer, i)}' for i in wanted)})",
        )
    missing = [i for i in wanted if i not in declared]
    if missing:
        return Check(
            "stop ids",
            "FAIL",
            note=f"eos_token_id [{shown}] lacks {', '.join(f'{i} {_token(renderer, i)}' for i in missing)}: "
            "HF generate will not stop at the end of the turn",
        )
    return Check("stop ids", "pass", note=f"eos_token_id [{shown}]")


def _pad_check(theirs: Any, renderer: Any, *, required: bool) -> Check:
    pad = theirs.config.pad_token_id
    if pad is not None:
        return Check("pad id", "pass", note=f"pad_token_id {pad} {_token(renderer, pad)}")
    if required:
        return Check(
            "pad id",
            "FAIL",
            note="config.json has no pad_token_id: AutoModelForSequenceClassification refuses batches above 1",
        )
    return Check(
        "pad id", "warn", note="config.json has no pad_token_id: HF pads batched generation with EOS"
    )


def _lm_checks(ours, theirs, renderer, prompts, settings: Settings, torch) -> list[Check]:
    import jax
    import jax.numpy as jnp

    from jaxrl_llm.rollout import SamplingParams
    from jaxrl_llm.rollout.text import ChatSampler

    checks = [_stop_check(theirs, renderer), _pad_check(theirs, renderer, required=False)]
    rendered = [renderer.render_prompt(p["prompt"]).tolist() for p in prompts]

    def our_logits(ids: list[int]) -> np.ndarray:
        return np.asarray(ours(jnp.asarray([ids], jnp.int32)))[0]

    for i, ids in enumerate(rendered):
        want = theirs(input_ids=torch.tensor([ids])).logits[0].float().numpy()
        got = our_logits(ids)
        delta = float(np.abs(got - want).max())
        differs = np.flatnonzero(got.argmax(-1) != want.argmax(-1))
        diverge = None
        if differs.size:
            k = int(differs[0])
            diverge = (
                f"{k}: {_token(renderer, int(got[k].argmax()))} vs {_token(renderer, int(want[k].argmax()))}"
            )
        ok = delta <= settings.atol
        note = f"{len(ids)} prompt tokens" + ("" if ok else f"; above the tolerance {settings.atol:g}")
        checks.append(Check(f"logits p{i}", "pass" if ok else "FAIL", delta, diverge, note))

    budget = min(settings.max_new_tokens, ours.cfg.max_seq_len - max(map(len, rendered)))
    if budget < 1:
        raise SanityError(f"a prompt fills the model's context ({ours.cfg.max_seq_len} tokens)")
    chat = ChatSampler(ours, renderer, batch_size=len(prompts))
    completions = chat.generate(
        [p["prompt"] for p in prompts],
        key=jax.random.key(0),
        max_new_tokens=budget,
        sampling=SamplingParams.greedy(),
    )
    for i, (ids, (completion,)) in enumerate(zip(rendered, completions, strict=True)):
        try:
            out = theirs.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                do_sample=False,
                max_new_tokens=budget,
            )
        except Exception as err:  # noqa: BLE001 - a generation config HF refuses fails the check
            checks.append(
                Check(f"greedy p{i}", "FAIL", note=f"HF generate: {type(err).__name__}: {_line(err)}")
            )
            continue
        hf_ids = out[0, len(ids) :].tolist()
        checks.append(_greedy_check(i, ids, completion, hf_ids, budget, renderer, our_logits, settings))
    return checks


def _greedy_check(i, prompt, completion, hf_ids, budget, renderer, our_logits, settings: Settings) -> Check:
    name = f"greedy p{i}"
    mine = completion.token_ids
    text = renderer.tokenizer.decode
    if mine == hf_ids:
        if completion.finish_reason == "length":
            return Check(name, "pass", note=f"{_short(text(mine))}; neither stopped within {budget} tokens")
        return Check(name, "pass", note=f"{_short(text(mine))}; both stop at {_token(renderer, mine[-1])}")
    k, a, b, diverge = _first_difference(mine, hf_ids, renderer)
    shown = f"ours {_short(text(mine))}, HF {_short(text(hf_ids))}"
    if a is None:  # the same tokens up to our stop id, and HF went on
        return Check(name, "FAIL", diverge=diverge, note=f"HF generate ran past the end of the turn: {shown}")
    if b is None:
        return Check(name, "FAIL", diverge=diverge, note=f"HF generate stopped before we did: {shown}")
    # Both chose a token: a near tie between the two (rounding decides) is no defect of the checkpoint.
    logits = our_logits(list(prompt) + mine[:k])[-1]
    gap = float(logits[a] - logits[b])
    if gap <= settings.atol:
        return Check(name, "warn", diverge=diverge, note=f"a near tie (logit gap {gap:.2g}): {shown}")
    return Check(name, "FAIL", diverge=diverge, note=f"our logit gap {gap:.3g} there: {shown}")


# ------------------------------------------------------------------------------------------ reward model


def score_conversations(prompts) -> list[list[dict[str, Any]]]:
    """What a reward model's checks score: each prompt answered (its ground truth, else a default answer)."""
    return [
        [
            *p["prompt"],
            {
                "role": "assistant",
                "content": p.get("ground_truth") or DEFAULT_ANSWERS[i % len(DEFAULT_ANSWERS)],
            },
        ]
        for i, p in enumerate(prompts)
    ]


def _score_checks(ours, theirs, renderer, conversations, settings: Settings, torch) -> list[Check]:
    import jax.numpy as jnp

    from jaxrl_llm.models import sequence_scores

    checks = [_pad_check(theirs, renderer, required=True)]
    seqs = [renderer.render_ids(c).tolist() for c in conversations]
    n = len(seqs)
    if len({len(s) for s in seqs}) < 2:  # the batch check needs padding: add a default conversation
        extra = [{"role": "user", "content": DEFAULT_PROMPTS[3]}, {"role": "assistant", "content": "Yes."}]
        seqs.append(renderer.render_ids(extra).tolist())

    def our_scores(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        t, m = jnp.asarray(tokens), jnp.asarray(mask)
        return np.asarray(sequence_scores(ours(t, attention_mask=m), m))

    singles = []
    for i, ids in enumerate(seqs[:n]):
        want = float(theirs(input_ids=torch.tensor([ids])).logits[0, 0])
        got = float(our_scores(np.asarray([ids]), np.ones((1, len(ids)), np.int32))[0])
        singles.append(got)
        delta = abs(got - want)
        ok = delta <= settings.atol
        note = f"{len(ids)} tokens, score {got:.4g}" + (
            "" if ok else f"; above the tolerance {settings.atol:g}"
        )
        checks.append(Check(f"score p{i}", "pass" if ok else "FAIL", delta, note=note))

    pad = theirs.config.pad_token_id
    width = max(map(len, seqs))
    tokens = np.full((len(seqs), width), 0 if pad is None else pad, np.int64)
    mask = np.zeros((len(seqs), width), np.int64)
    for i, ids in enumerate(seqs):  # right padding, as HF tokenizers pad for classification
        tokens[i, : len(ids)], mask[i, : len(ids)] = ids, 1
    name = f"batched scores ({len(seqs)} rows)"
    try:
        want = theirs(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
    except Exception as err:  # noqa: BLE001 - HF's refusal (no pad id) is the failure this check is for
        checks.append(Check(name, "FAIL", note=f"AutoModelForSequenceClassification: {_line(err)}"))
        return checks
    got = our_scores(tokens.astype(np.int32), mask.astype(np.int32))
    delta = float(np.abs(got - want).max())
    ok = delta <= settings.atol
    lengths = "/".join(str(len(s)) for s in seqs)
    note = f"right-padded rows of {lengths} tokens" + (
        "" if ok else f"; above the tolerance {settings.atol:g}"
    )
    if not ok and pad is not None and any(s[-1] == pad for s in seqs):
        note += f"; a row ends with the pad id {pad}, which HF takes for padding"
    checks.append(Check(name, "pass" if ok else "FAIL", delta, note=note))
    return checks
