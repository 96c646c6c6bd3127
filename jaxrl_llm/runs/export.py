"""``runs export RUN --step N`` and ``python -m jaxrl_llm.export RUN [--step N] --out DIR``: any checkpoint
of a run as an HF checkpoint directory (safetensors, ``config.json`` and ``generation_config.json`` with the
stop and pad ids, the tokenizer with the run's chat template), the same files the run writes to ``final/``
for its last step.

The model graph comes from the run's ``train_config.json`` (abstractly: no weights are initialised or read
from ``model.path``), and only the ``params`` subtree of the checkpoint's training state is read (Orbax
partial restore: the optimizer's moments stay on disk). The arrays are placed on one device, so the model
must fit one device's memory (or the host's, on CPU).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxrl_llm.checkpoint.registry import checkpoint_steps
from jaxrl_llm.errors import UserError

from .browse import RunError, load_run

EXPORT_PREFIX = "export-step-"
# The part of a stage's trainable model that is exported, as a path into its parameters (``Stage.policy``
# of jaxrl_llm.train.stages: PPO trains an actor-critic and exports its policy).
EXPORTED_PART = {"ppo": ("policy",)}


def _config(run_dir: Path) -> Any:
    import ml_collections

    config = load_run(run_dir).get("config")
    if not config:
        raise RunError(f"{run_dir}: no train_config.json, so the model cannot be rebuilt")
    cfg = ml_collections.ConfigDict(config)
    cfg.run_dir = str(run_dir)  # the tokenizer a run trained lives here, wherever the run was moved
    return cfg


def latest_step(run_dir: Path) -> int:
    """The step of the run's last complete checkpoint."""
    steps = checkpoint_steps(run_dir)
    if not steps:
        raise RunError(
            f"{run_dir}: no checkpoints (none saved yet, or train.save_every=0); its final model, if it "
            "finished, is the HF checkpoint in final/"
        )
    return steps[-1]


def _tokenizer(cfg: Any, run_dir: Path) -> Any:
    """The run's tokenizer, or the copy in its ``final/`` when its source has moved."""
    from jaxrl_llm.render import load_tokenizer
    from jaxrl_llm.train.setup import load_or_train_tokenizer

    try:
        return load_or_train_tokenizer(cfg)
    except (UserError, OSError):
        if (run_dir / "final" / "tokenizer_config.json").is_file():
            return load_tokenizer(run_dir / "final")
        raise


def _architecture(cfg: Any, run_dir: Path, vocab_size: int) -> Any:
    """The model's ``ModelConfig`` as the run built it (``model.path``'s config, else the preset sized by
    the config and the tokenizer); the run's own ``final/config.json`` when ``model.path`` has moved."""
    from jaxrl_llm.models import from_hf_config, model_config, read_hf_config

    section = cfg.model
    try:
        arch = model_config(section)
    except (UserError, OSError):
        if not (run_dir / "final" / "config.json").is_file():
            raise
        execution = dict(
            param_dtype=section.param_dtype,
            dtype=section.dtype,
            remat=section.remat,
            scan_layers=bool(section.scan_layers),
        )
        return from_hf_config(read_hf_config(run_dir / "final"), **execution)
    if not section.path and section.vocab_size is None:
        arch = arch.replace(vocab_size=vocab_size)
    return arch


def restore_params(run_dir: Path, step: int, abstract: Any, part: tuple[str, ...] = ()) -> Any:
    """The ``params`` subtree (at ``part`` inside it) of checkpoint ``step``, shaped as ``abstract`` (an
    ``nnx.State`` of ``ShapeDtypeStruct``s), on the first device."""
    import jax
    import orbax.checkpoint as ocp

    from jaxrl_llm.checkpoint.manager import DIRNAME, quiet_coroutines

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    item: Any = target
    for key in reversed(("params", *part)):
        item = {key: item}
    where = run_dir / DIRNAME / str(step) / "state"
    args = ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
    )
    try:
        with quiet_coroutines(), ocp.PyTreeCheckpointer() as reader:
            restored = reader.restore(where.absolute(), args=args)
    except Exception as err:  # noqa: BLE001 - a missing, damaged or mismatched checkpoint, however it shows
        raise RunError(
            f"{where}: cannot restore its parameters into the model train_config.json describes: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    for key in ("params", *part):
        restored = restored[key]
    return restored


def export_checkpoint(
    run_dir: Path, step: int | None = None, out: Path | None = None, *, adapter: bool = False
) -> tuple[Path, str]:
    """Writes checkpoint ``step`` (default: the last) of ``run_dir`` as an HF checkpoint to ``out`` (default
    ``<run_dir>/export-step-<step>``), with the stop and pad ids and the chat template of the run's renderer;
    returns ``(out, params_sha256)`` (the digest ``summary.json`` gives for the final parameters).

    A LoRA run's checkpoints hold its adapters only: the base is loaded from its ``model.path`` again (and
    must be the one recorded in ``lora_base.json``), and the export has the adapters merged in, or with
    ``adapter`` is the adapters alone as a PEFT adapter directory."""
    steps = checkpoint_steps(run_dir)
    step = latest_step(run_dir) if step is None else step
    if step not in steps:
        kept = ", ".join(map(str, steps)) if steps else "none"
        raise RunError(f"{run_dir}: no checkpoint of step {step} (available: {kept})")
    from flax import nnx

    from jaxrl_llm.checkpoint import params_digest
    from jaxrl_llm.models import abstract_model
    from jaxrl_llm.models.lora import LoRAConfig
    from jaxrl_llm.render import Renderer
    from jaxrl_llm.train.setup import adapter_export, hf_export, lora_base_model
    from jaxrl_llm.train.stages import STAGES

    cfg = _config(run_dir)
    if cfg.stage not in STAGES:
        raise RunError(f"{run_dir}: stage {cfg.stage!r} is not one this version can rebuild")
    tokenizer = _tokenizer(cfg, run_dir)
    renderer = Renderer.from_config(cfg, tokenizer)
    part = EXPORTED_PART.get(cfg.stage, ())
    if LoRAConfig.from_config(cfg.get("lora")).rank > 0:
        model = _lora_model(cfg, run_dir, step, tokenizer, part)
    elif adapter:
        raise RunError(
            f"{run_dir}: not a LoRA run (lora.rank is 0), so it has no adapter: export without --adapter"
        )
    else:
        arch = _architecture(cfg, run_dir, tokenizer.vocab_size)
        graphdef, abstract = nnx.split(abstract_model(arch, head=STAGES[cfg.stage].head), nnx.Param)
        model = nnx.merge(graphdef, restore_params(run_dir, step, abstract, part))
    out = out if out is not None else run_dir / f"{EXPORT_PREFIX}{step}"
    if adapter:
        adapter_export(renderer, base_model=lora_base_model(cfg))(model, out)
    else:
        hf_export(renderer)(model, out)
    return out, params_digest(nnx.state(model, nnx.Param))


def _lora_model(cfg: Any, run_dir: Path, step: int, tokenizer: Any, part: tuple[str, ...]) -> Any:
    """A LoRA run's model at ``step``: its base from ``model.path`` (refused when it is not the base the run
    recorded) with the checkpoint's adapters (and trained heads)."""
    import jax
    from flax import nnx

    from jaxrl_llm.models.lora import TRAINABLE
    from jaxrl_llm.models.lora_io import base_fingerprint, fingerprint_differences
    from jaxrl_llm.train.setup import LORA_BASE_NAME, build_model
    from jaxrl_llm.train.stages import STAGES

    try:
        model = build_model(cfg, tokenizer, None, head=STAGES[cfg.stage].head)
    except (UserError, OSError) as err:
        raise RunError(
            f"{run_dir}: a LoRA run's checkpoints hold its adapters only, and its base (model.path="
            f"{cfg.model.path!r}) cannot be loaded: {err}"
        ) from None
    record = run_dir / LORA_BASE_NAME
    if record.is_file():
        saved = json.loads(record.read_text()).get("weights", {})
        differ = fingerprint_differences(saved, base_fingerprint(model))
        if differ:
            raise RunError(
                f"{run_dir}: model.path={cfg.model.path!r} is no longer the base its adapters were trained on "
                f"({len(differ)} weights differ from {record}, e.g. {differ[0]})"
            )
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.state(model, TRAINABLE))
    nnx.update(model, restore_params(run_dir, step, abstract, part))
    return model


def export_lines(run_dir: Path, step: int, out: Path, digest: str) -> list[str]:
    """What an export prints: where it went, and whether it holds the parameters of the run's ``final/``."""
    lines = [f"exported step {step} of {run_dir} to {out} (params sha256 {digest})"]
    from jaxrl_llm.models.lora_io import ADAPTER_CONFIG

    if (out / ADAPTER_CONFIG).is_file():
        base = json.loads((out / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        return lines + [
            f"a PEFT LoRA adapter (peft.PeftModel.from_pretrained(base, {str(out)!r})) for the base {base}"
        ]
    hf = json.loads((out / "config.json").read_text())
    ids = ", ".join(f"{k} {json.dumps(hf.get(k))}" for k in ("eos_token_id", "pad_token_id", "bos_token_id"))
    from jaxrl_llm.models.hf_io import GENERATION_CONFIG

    has_generation = (out / GENERATION_CONFIG).is_file()
    lines.append(
        f"config.json and generation_config.json: {ids}"
        if has_generation
        else f"config.json: {ids} (no generation_config.json: no EOS id is known, so HF generate will not stop)"
    )
    art = load_run(run_dir)
    final = art.get("final") or {}
    if final.get("params_sha256") == digest:
        lines.append(f"the same parameters as the run's final export ({final.get('path')})")
    elif art.get("stage") == "ppo":
        lines.append("the policy alone (summary.json's params_sha256 covers the policy and its critic)")
    return lines
