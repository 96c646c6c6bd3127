"""Building the model a ``config.model`` section describes: a preset sized by overrides, or an HF checkpoint."""

from __future__ import annotations

from jax.sharding import Mesh

from .config import SIZE_FIELDS, ModelConfig, from_hf_config
from .create import create_model
from .hf_io import load_hf, read_hf_config
from .presets import get_preset


def model_config(section) -> ModelConfig:
    """The :class:`ModelConfig` a validated ``config.model`` section describes (preset + size overrides)."""
    execution = dict(
        param_dtype=section.param_dtype,
        dtype=section.dtype,
        remat=section.remat,
        scan_layers=bool(section.scan_layers),
        attention=_attention(section),
    )
    if section.path:
        return from_hf_config(read_hf_config(section.path), **execution)
    sizes = {k: getattr(section, k) for k in SIZE_FIELDS if getattr(section, k) is not None}
    return get_preset(section.preset, **sizes, **execution)


def build_model(
    section, *, seed: int = 0, mesh: Mesh | None = None, head: str = "lm", vocab_size: int | None = None
):
    """The model a validated ``config.model`` section names: loaded from ``path``, else built from scratch.

    ``vocab_size`` (a tokenizer's) sizes a model built from scratch whose ``section.vocab_size`` is None.
    """
    if section.path:
        return load_hf(
            section.path,
            dtype=section.param_dtype,
            compute_dtype=section.dtype,
            mesh=mesh,
            head=head,
            remat=section.remat,
            scan_layers=bool(section.scan_layers),
            attention=_attention(section),
        )
    arch = model_config(section)
    if section.vocab_size is None and vocab_size is not None:
        arch = arch.replace(vocab_size=vocab_size)
    return create_model(arch, seed=seed, mesh=mesh, head=head)


def _attention(section) -> str:
    """``model.attention``; "auto" for configs written before the key existed (older runs' snapshots)."""
    return getattr(section, "attention", None) or "auto"
