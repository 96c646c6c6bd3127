"""What a stage builds before its first step: the tokenizer, the datasets and the model, from the config.

Model sources, in order: ``model.path`` (an HF checkpoint directory, or a previous run's ``run_dir``, whose
final export ``<run_dir>/final`` is then used), else ``model.preset`` with fresh weights. The tokenizer is
``tokenizer.path``, else the model's directory, else (``tokenizer.train_vocab_size``) a byte-level BPE
trained on the training data and kept in ``<run_dir>/tokenizer``, which a resumed run reuses.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import ml_collections

from jaxrl_llm.data.records import DataError
from jaxrl_llm.errors import UserError
from jaxrl_llm.models.hf_io import checkpoint_dir

TOKENIZER_DIRNAME = "tokenizer"
EVAL_MANIFEST_NAME = "eval_data_manifest.json"
LORA_BASE_NAME = "lora_base.json"  # the base model a LoRA run's adapters were trained on
ADAPTER_DIRNAME = "adapter"  # a LoRA run's PEFT adapter, beside final/


class SetupError(UserError):
    """A run that cannot be assembled from its config (no tokenizer, an empty split, ...)."""


def _texts(records: list[dict]) -> list[str]:
    """Every string a tokenizer should learn from: message contents and raw text."""
    out = []
    for r in records:
        if "text" in r:
            out.append(r["text"])
        for key in ("messages", "prompt", "chosen", "rejected", "completion"):
            for m in r.get(key) or ():
                if isinstance(m, dict) and isinstance(m.get("content"), str):
                    out.append(m["content"])
    return out


def load_or_train_tokenizer(cfg: ml_collections.ConfigDict, records: list[dict] | None = None):
    """The run's tokenizer (see the module docstring). ``records`` are needed only to train one."""
    from jaxrl_llm.parallel import barrier, is_main_process
    from jaxrl_llm.render import load_tokenizer

    if cfg.tokenizer.path:
        return load_tokenizer(cfg.tokenizer.path)
    if cfg.model.path:
        return load_tokenizer(checkpoint_dir(cfg.model.path))
    saved = Path(cfg.run_dir) / TOKENIZER_DIRNAME
    if (saved / "tokenizer_config.json").exists():
        return load_tokenizer(saved)
    if cfg.tokenizer.train_vocab_size is None:
        raise SetupError(
            "no tokenizer: set tokenizer.path (an HF tokenizer directory or SentencePiece .model), or "
            "model.path (its tokenizer is used), or tokenizer.train_vocab_size to train one on the data"
        )
    if not records:
        raise SetupError("tokenizer.train_vocab_size is set but there are no training records to train on")
    from jaxrl_llm.render.train_tokenizer import save_hf_tokenizer, train_byte_level_bpe

    if is_main_process():
        tok = train_byte_level_bpe(
            _texts(records), vocab_size=cfg.tokenizer.train_vocab_size, split_digits=True
        )
        save_hf_tokenizer(tok, saved)
    barrier("tokenizer")
    return load_tokenizer(saved)


def _read(cfg: ml_collections.ConfigDict, path: str, renderer: Any, rejects: str | None):
    from jaxrl_llm.data.filters import FilterConfig
    from jaxrl_llm.data.load import load_dataset

    data = cfg.data
    return load_dataset(
        path,
        format=data.format,
        kind=data.kind,
        dataset_info=data.dataset_info or None,
        name=data.name or None,
        on_error=data.on_error,
        rejects_path=rejects if data.on_error == "skip" else None,
        filters=FilterConfig.from_config(cfg) if renderer is not None else FilterConfig(),
        renderer=renderer,
    )


def raw_records(cfg: ml_collections.ConfigDict):
    """The training data (``LoadedDataset``) without token-length filters, for training a tokenizer before
    anything can be rendered."""
    from jaxrl_llm.data.load import REJECTS_NAME, require_records
    from jaxrl_llm.parallel import is_main_process

    if not cfg.data.path and not cfg.data.dataset_info:
        raise DataError("data.path is empty: set it to the dataset file or directory")
    # Rejects are written here too (load_datasets rewrites them): when none is accepted, the error names them.
    skip = cfg.data.on_error == "skip" and is_main_process()
    rejects = str(Path(cfg.run_dir) / REJECTS_NAME) if skip else None
    loaded = _read(cfg, cfg.data.path, None, rejects)
    require_records(loaded, rejects, "data.path" if cfg.data.path else "")
    return loaded


def split_eval(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """``(train, eval)``: a seeded ``fraction`` of ``records`` held out (at least one when fraction > 0)."""
    if not fraction:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(records) * fraction))
    if n_eval >= len(records):
        raise SetupError(f"data.eval_split={fraction} of {len(records)} records leaves nothing to train on")
    held = set(order[:n_eval])
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [records[i] for i in sorted(held)]


def load_datasets(cfg: ml_collections.ConfigDict, renderer: Any) -> tuple[Any, list[dict], list[dict]]:
    """``(loaded, train_records, eval_records)``: the training data through the data layer (rejects and
    manifest in run_dir, parity check), and the evaluation records from ``data.eval_path`` or a held-out
    ``data.eval_split``."""
    from jaxrl_llm.data.load import load_from_config, require_records
    from jaxrl_llm.parallel import is_main_process

    loaded = load_from_config(cfg, renderer, write=is_main_process())  # DataError when none is accepted
    train, held = split_eval(loaded.records, float(cfg.data.eval_split), cfg.seed)
    if cfg.data.eval_path:
        run_dir = Path(cfg.run_dir)
        rejects = str(run_dir / "eval_rejects.jsonl") if is_main_process() else None
        ev = _read(cfg, cfg.data.eval_path, renderer, rejects)
        require_records(ev, rejects if cfg.data.on_error == "skip" else None, "data.eval_path")
        if is_main_process():
            (run_dir / EVAL_MANIFEST_NAME).write_text(json.dumps(ev.manifest, indent=2) + "\n")
        held = ev.records
    return loaded, train, held


def build_model(cfg: ml_collections.ConfigDict, tokenizer: Any, mesh: Any, *, head: str = "lm"):
    """The model ``cfg.model`` names, checked against the tokenizer, with ``cfg.lora``'s adapters when
    ``lora.rank > 0``. A model from scratch without an explicit ``model.vocab_size`` takes the tokenizer's
    vocabulary size."""
    from jaxrl_llm.models import build_model as build

    model = build(cfg.model, seed=cfg.seed, mesh=mesh, head=head, vocab_size=tokenizer.vocab_size)
    tokenizer.check_fits(model.cfg.vocab_size)
    return with_lora(cfg, model, mesh)


def with_lora(cfg: ml_collections.ConfigDict, model: Any, mesh: Any = None) -> Any:
    """``model`` with ``cfg.lora``'s adapters (unchanged when ``lora.rank`` is 0 or the config predates it)."""
    from jaxrl_llm.models.lora import LoRAConfig, apply_lora

    return apply_lora(model, LoRAConfig.from_config(cfg.get("lora")), seed=cfg.seed, mesh=mesh)


def record_lora_base(cfg: ml_collections.ConfigDict, run_dir: Path, model: Any) -> None:
    """A LoRA run's checkpoints hold its adapters only, the base coming again from ``model.path``: the
    base's fingerprint goes to ``<run_dir>/lora_base.json`` when the run starts, and a run resuming from
    checkpoints made on another base is refused (naming the weights that differ)."""
    from jaxrl_llm.checkpoint.registry import checkpoint_steps
    from jaxrl_llm.models.lora_io import base_fingerprint, fingerprint_differences
    from jaxrl_llm.parallel import barrier, is_main_process

    record = run_dir / LORA_BASE_NAME
    now = base_fingerprint(model)
    if checkpoint_steps(run_dir) and record.is_file():
        saved = json.loads(record.read_text())
        differ = fingerprint_differences(saved.get("weights", {}), now)
        if differ:
            raise SetupError(
                f"{run_dir} holds LoRA checkpoints trained on another base model: {len(differ)} of "
                f"{len(now)} base weights differ from {record} (e.g. {differ[0]}; that base: model.path="
                f"{saved.get('model.path')!r}, model.preset={saved.get('model.preset')!r}). Point model.path "
                "at the base the adapters were trained on, or use a new run_dir"
            )
        return
    if is_main_process():
        source = {"model.path": cfg.model.path, "model.preset": "" if cfg.model.path else cfg.model.preset}
        record.write_text(json.dumps({**source, "seed": cfg.seed, "weights": now}, indent=1) + "\n")
    barrier("lora base")


@dataclasses.dataclass(frozen=True)
class RoleMeshes:
    """The RL roles' meshes of their own (``rollout.mesh``, ``rl.reference_mesh``, ``reward.mesh``); None:
    the role shares the training mesh."""

    rollout: Any = None
    reference: Any = None
    reward: Any = None

    @classmethod
    def split(cls, cfg: ml_collections.ConfigDict) -> tuple[Any, RoleMeshes]:
        """The training mesh and the roles' meshes of an RL stage's config (``parallel.role_meshes``)."""
        from jaxrl_llm.config.schema import ROLE_MESHES
        from jaxrl_llm.parallel import mesh_from_config, parse_mesh, role_meshes

        shapes = {}
        if cfg.stage in ("grpo", "ppo"):
            shapes = {key: parse_mesh(_get(cfg, key), key) for key in ROLE_MESHES if _get(cfg, key)}
        if not shapes:
            return mesh_from_config(cfg.parallel), cls()
        mesh, roles = role_meshes(cfg.parallel, shapes)
        return mesh, cls(*(roles.get(key) for key in ROLE_MESHES))

    def described(self) -> str:
        shown = (
            ("rollouts on", self.rollout),
            ("the reference on", self.reference),
            ("reward models on", self.reward),
        )
        return "; ".join(f"{name} a mesh of their own: {dict(m.shape)}" for name, m in shown if m is not None)


def _get(cfg: ml_collections.ConfigDict, key: str) -> Any:
    section, name = key.split(".")
    return cfg[section][name]


class StageRun(NamedTuple):
    run_dir: Path
    mesh: Any
    tokenizer: Any
    renderer: Any
    loaded: Any  # the LoadedDataset (manifest, counts, content hash)
    train_records: list[dict]
    eval_records: list[dict]
    model: Any
    roles: RoleMeshes = RoleMeshes()  # the RL roles' meshes of their own


def resolve_epochs(cfg: ml_collections.ConfigDict, per_epoch: int, updates_per_step: int = 1) -> None:
    """``train.epochs`` -> ``train.steps`` (``ceil(epochs * per_epoch)``), set in ``cfg`` before the resolved
    config is written and the optimizer's schedule is made."""
    import math

    from .loop import log

    steps = max(1, math.ceil(cfg.train.epochs * per_epoch))
    if steps * updates_per_step < cfg.optimizer.warmup_steps:
        raise SetupError(
            f"train.epochs={cfg.train.epochs:g} is {steps} steps ({per_epoch} an epoch), fewer than "
            f"optimizer.warmup_steps={cfg.optimizer.warmup_steps}: lower the warmup or train longer"
        )
    log(f"train.epochs={cfg.train.epochs:g}: one epoch is {per_epoch} steps, so train.steps={steps}")
    cfg.train.steps = steps


def start_stage(
    cfg: ml_collections.ConfigDict,
    check_kind: Callable[[str, str | None], None],
    *,
    head: str = "lm",
    epoch_steps: Callable[[list[dict], Any], int] | None = None,
    updates_per_step: int = 1,
) -> StageRun:
    """What every training stage does first: join the processes, make ``run_dir`` and the mesh, load or train
    the tokenizer (``check_kind(stage, kind)`` refuses data the stage cannot train on, before a tokenizer is
    trained on it), render and split the data, resolve ``train.epochs`` into ``train.steps`` with
    ``epoch_steps(train_records, renderer)``, build the model with ``head``, write ``run_info.json``."""
    from jaxrl_llm.checkpoint import write_run_info
    from jaxrl_llm.models import count_params
    from jaxrl_llm.models.lora import adapters, config_of, has_lora, trained_count
    from jaxrl_llm.parallel import initialize
    from jaxrl_llm.render import Renderer

    from .loop import log

    initialize(cfg.parallel.coordinator_address, cfg.parallel.num_processes, cfg.parallel.process_id)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mesh, roles = RoleMeshes.split(cfg)
    raw = None
    if not (cfg.tokenizer.path or cfg.model.path):  # the tokenizer is trained on the data
        raw = raw_records(cfg)
        check_kind(cfg.stage, raw.kind)
    tokenizer = load_or_train_tokenizer(cfg, raw.records if raw is not None else None)
    renderer = Renderer.from_config(cfg, tokenizer)
    loaded, train_records, eval_records = load_datasets(cfg, renderer)
    check_kind(cfg.stage, loaded.kind)
    log(
        f"data: {len(train_records)} training records, {len(eval_records)} evaluation records "
        f"(content hash {loaded.content_hash[:12]}; {loaded.counts})"
    )
    if cfg.train.epochs is not None and epoch_steps is not None:
        resolve_epochs(cfg, epoch_steps(train_records, renderer), updates_per_step)
    model = build_model(cfg, tokenizer, mesh, head=head)
    params = count_params(model)
    log(f"model: {model.cfg.family} ({head} head), {params:,} parameters on mesh {dict(mesh.shape)}")
    if has_lora(model):
        record_lora_base(cfg, run_dir, model)
        lora = config_of(model)
        log(
            f"lora: rank {lora.rank}, alpha {lora.lora_alpha:g}, dropout {lora.dropout:g} on "
            + ", ".join(p for p, _ in adapters(model))
            + f": {trained_count(model):,} trained parameters, the base frozen"
        )
    if roles.described():
        log(roles.described())
    write_run_info(
        run_dir,
        config_dict=cfg.to_dict(),
        seed=cfg.seed,
        mesh=mesh,
        tokenizer_identity={**renderer.identity(), "vocab_size": tokenizer.vocab_size},
        data_manifests={"train": loaded.manifest},
        extra={"model": {"family": model.cfg.family, "parameters": params, "head": head}},
    )
    return StageRun(run_dir, mesh, tokenizer, renderer, loaded, train_records, eval_records, model, roles)


def export_token_ids(renderer: Any) -> Any:
    """The ``TokenIds`` an export of a model trained with ``renderer`` declares: the tokenizer's EOS ids and
    the chat template's end-of-turn id (where our sampler stops), its pad id (else the first of those) and
    its BOS id, so that HF ``generate`` stops at the end of the turn and HF's sequence classifiers pad."""
    from jaxrl_llm.models import TokenIds
    from jaxrl_llm.rollout.text import end_of_turn_ids

    tok = renderer.tokenizer
    eos = end_of_turn_ids(renderer)
    pad = tok.pad_id if tok.pad_id is not None else (eos[0] if eos else None)
    return TokenIds(bos=tok.bos_id, eos=tuple(eos), pad=pad)


def hf_export(renderer: Any, part: Callable[[Any], Any] = lambda model: model) -> Callable[[Any, Path], None]:
    """``export(model, out)`` for ``run_loop``: ``part(model)`` (the model, or the policy of PPO's
    actor-critic; LoRA adapters merged into the weights) as an HF checkpoint with the stop and pad ids of
    ``renderer`` (``export_token_ids``) in its ``config.json`` and ``generation_config.json``, and its
    tokenizer with the chat template it was trained with beside it."""
    token_ids = export_token_ids(renderer)
    # A built-in template replaces the tokenizer's own in the export; the tokenizer's own stays as it is
    # (all of its named templates, when it has several).
    template = renderer.template_text if renderer.template_name != "tokenizer" else None

    def export(model: Any, out: Path) -> None:
        from jaxrl_llm.models import save_hf
        from jaxrl_llm.models.lora import merged
        from jaxrl_llm.parallel import is_main_process

        save_hf(merged(part(model)), out, token_ids=token_ids)
        if is_main_process():
            save_tokenizer(renderer.tokenizer, out, chat_template=template)

    return export


def adapter_export(
    renderer: Any, part: Callable[[Any], Any] = lambda model: model, base_model: str | None = None
) -> Callable[[Any, Path], None]:
    """``export(model, out)``: the LoRA adapters of ``part(model)`` as a PEFT adapter directory
    (``models.lora_io.save_peft``; ``base_model`` its ``base_model_name_or_path``) with the tokenizer and
    the run's chat template beside them."""
    template = renderer.template_text if renderer.template_name != "tokenizer" else None

    def export(model: Any, out: Path) -> None:
        from jaxrl_llm.models.lora_io import save_peft
        from jaxrl_llm.parallel import is_main_process

        save_peft(part(model), out, base_model=base_model)
        if is_main_process():
            save_tokenizer(renderer.tokenizer, out, chat_template=template)

    return export


def lora_base_model(cfg: ml_collections.ConfigDict) -> str | None:
    """The HF checkpoint directory a LoRA run adapts (absolute), for a PEFT adapter's config; None for a
    model built from scratch (PEFT cannot rebuild it)."""
    return str(checkpoint_dir(cfg.model.path).absolute()) if cfg.model.path else None


def save_tokenizer(tokenizer: Any, out: Path, *, chat_template: str | None = None) -> None:
    """The tokenizer next to the exported weights, so the export is a complete model directory.

    ``chat_template`` (the run's, when it trained with a built-in one) is saved as the tokenizer's own, so
    that HF ``apply_chat_template`` and a later run from the export render the prompts this one trained on.
    """
    import shutil

    if tokenizer.hf is not None:
        own = tokenizer.hf.chat_template
        if chat_template is not None:
            tokenizer.hf.chat_template = chat_template
        try:
            tokenizer.hf.save_pretrained(str(out))
        finally:
            tokenizer.hf.chat_template = own
    elif Path(tokenizer.name_or_path).is_file():  # a SentencePiece .model
        shutil.copy(tokenizer.name_or_path, out / "tokenizer.model")
