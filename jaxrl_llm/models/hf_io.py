"""HF checkpoint directories (``config.json`` + safetensors, single or sharded) in and out.

Our weights use einsum layout with a leading layer axis; HF stores ``[out, in]`` matrices per layer. The
table below names, for every parameter path, its HF key and how to convert it, and is used in both
directions, so load and save cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxrl_llm.errors import UserError

from ..parallel import DEFAULT_RULES, barrier, is_main_process, state_shardings, to_host
from .config import ModelConfig, from_hf_config, to_hf_config
from .create import abstract_model
from .layers import INIT_STD

log = logging.getLogger(__name__)


class CheckpointError(UserError):
    """An HF checkpoint directory that cannot be read (missing files or tensors, wrong shapes)."""


# (path inside a block) -> (HF key inside `model.layers.{i}.`, conversion). Conversions: "linearN" = an HF
# [out, in] matrix whose first N of our axes are inputs; "flat" = same values, HF shape 1-D.
_BLOCK_KEYS = {
    ("attn_norm", "weight"): ("input_layernorm.weight", "flat"),
    ("attn", "q"): ("self_attn.q_proj.weight", "linear1"),
    ("attn", "k"): ("self_attn.k_proj.weight", "linear1"),
    ("attn", "v"): ("self_attn.v_proj.weight", "linear1"),
    ("attn", "o"): ("self_attn.o_proj.weight", "linear2"),
    ("attn", "q_bias"): ("self_attn.q_proj.bias", "flat"),
    ("attn", "k_bias"): ("self_attn.k_proj.bias", "flat"),
    ("attn", "v_bias"): ("self_attn.v_proj.bias", "flat"),
    ("attn", "o_bias"): ("self_attn.o_proj.bias", "flat"),
    ("attn", "q_norm", "weight"): ("self_attn.q_norm.weight", "flat"),
    ("attn", "k_norm", "weight"): ("self_attn.k_norm.weight", "flat"),
    ("mlp", "gate"): ("mlp.gate_proj.weight", "linear1"),
    ("mlp", "up"): ("mlp.up_proj.weight", "linear1"),
    ("mlp", "down"): ("mlp.down_proj.weight", "linear1"),
    ("attn_post_norm", "weight"): ("post_attention_layernorm.weight", "flat"),
    ("mlp_post_norm", "weight"): ("post_feedforward_layernorm.weight", "flat"),
}
_TOP_KEYS = {
    ("embed", "embedding"): ("model.embed_tokens.weight", "same"),
    ("final_norm", "weight"): ("model.norm.weight", "flat"),
    ("lm_head",): ("lm_head.weight", "linear1"),
    ("score", "weight"): ("score.weight", "row"),
    # TRL's AutoModelForCausalLMWithValueHead names; HF's CausalLM loader ignores these keys.
    ("value_head", "weight"): ("v_head.summary.weight", "row"),
    ("value_head", "bias"): ("v_head.summary.bias", "flat"),
}
_HEAD_PATHS = {("score", "weight"), ("value_head", "weight"), ("value_head", "bias")}
# Tensors a checkpoint may hold that this model rightly leaves out: cached RoPE tables, and heads the caller
# chose not to load (a policy read from a reward-model checkpoint, say). Any other leftover is an error: it
# means the checkpoint computes something this model would silently skip.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_OPTIONAL_HEAD_PREFIXES = ("score.", "v_head.", "lm_head.")


def _block_key(path: tuple[str, ...], cfg: ModelConfig) -> str:
    # Gemma 2 has four norms per block; Llama-style families call their pre-MLP norm post_attention_layernorm.
    if path == ("mlp_norm", "weight"):
        return "pre_feedforward_layernorm.weight" if cfg.post_norms else "post_attention_layernorm.weight"
    return _BLOCK_KEYS[path][0]


def hf_keys(path: tuple[str, ...], cfg: ModelConfig) -> tuple[list[str], str]:
    """(HF keys, conversion) for a parameter path; block parameters have one key per layer."""
    if path[0] != "blocks":
        key, kind = _TOP_KEYS[path]
        return [key], kind
    inner = path[1:]
    key, kind = _block_key(inner, cfg), "flat" if inner == ("mlp_norm", "weight") else _BLOCK_KEYS[inner][1]
    return [f"model.layers.{i}.{key}" for i in range(cfg.num_layers)], kind


def _hf_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    if kind.startswith("linear"):
        n_in = int(kind[-1])
        return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
    return {"same": shape, "flat": (math.prod(shape),), "row": (1, math.prod(shape))}[kind]


def _to_ours(x: np.ndarray, shape: tuple[int, ...], kind: str) -> np.ndarray:
    return (x.T if kind.startswith("linear") else x).reshape(shape)


def _to_hf(x: np.ndarray, kind: str) -> np.ndarray:
    hf_shape = _hf_shape(x.shape, kind)
    if kind.startswith("linear"):
        return np.ascontiguousarray(x.reshape(hf_shape[::-1]).T)
    return x.reshape(hf_shape)


class _SafetensorsReader:
    """Lazy reads from ``model.safetensors`` or a sharded ``model.safetensors.index.json`` checkpoint."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        single = path / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(
                    f"{index}: not a safetensors index (a JSON object with 'weight_map'): {e}"
                ) from None
        elif single.exists():
            weight_map = None
        else:
            found = sorted(p.name for p in path.iterdir())
            raise CheckpointError(
                f"{path}: no model.safetensors or model.safetensors.index.json (found: {', '.join(found) or 'nothing'})"
                + (
                    "; PyTorch .bin checkpoints are not supported, convert them to safetensors"
                    if any(f.endswith(".bin") for f in found)
                    else ""
                )
            )
        self._handles: dict[str, object] = {}
        if weight_map is None:
            handle = self._open(single)
            self.weight_map = {k: single.name for k in handle.keys()}
        else:
            self.weight_map = weight_map
        self.path = path

    def _open(self, file: Path):
        if file.name not in self._handles:
            if not file.exists():
                raise CheckpointError(f"{file}: listed in the safetensors index but missing")
            try:
                self._handles[file.name] = safe_open(str(file), framework="numpy")
            except (SafetensorError, OSError) as e:  # truncated, empty or not safetensors at all
                raise CheckpointError(
                    f"{file}: not a readable safetensors file ({e}); the file is truncated or corrupt: "
                    "export or copy the checkpoint again"
                ) from None
        return self._handles[file.name]

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def get(self, key: str) -> np.ndarray:
        return self._open(self.path / self.weight_map[key]).get_tensor(key)


RUN_EXPORT_DIRNAME = "final"  # where a training run exports its final model (jaxrl_llm.train)


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """``path``, or, for a training run's directory (no config.json, but ``final/config.json``), its final
    export: ``model.path`` may name a previous run."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    if (path / RUN_EXPORT_DIRNAME / "config.json").exists():
        return path / RUN_EXPORT_DIRNAME
    if (path / "run_info.json").exists() or (path / "checkpoints").is_dir():
        raise CheckpointError(
            f"{path}: a training run's directory without a final HF export ({RUN_EXPORT_DIRNAME}/): the run "
            "has not finished, or ran with train.export_hf=false; finish it (run the same command again), "
            "or point at an HF checkpoint directory"
        )
    return path


def read_hf_config(path: str | os.PathLike) -> dict:
    path = checkpoint_dir(path)
    if not path.is_dir():
        looks_like_hub_id = (
            not path.exists() and len(path.parts) == 2 and not str(path).startswith((".", "/"))
        )
        hub = "; Hub ids are not downloaded: fetch it first (e.g. `hf download ID --local-dir DIR`)"
        raise CheckpointError(
            f"{path}: not a directory (expected an HF checkpoint directory with config.json)"
            + (hub if looks_like_hub_id else "")
        )
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: no config.json")
    try:
        hf = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({err})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object, got {type(hf).__name__}")
    return hf


def _head_from_hf(hf: dict) -> str:
    """The head a checkpoint carries, from its ``architectures`` entry."""
    archs = hf.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        num_labels = len(hf.get("id2label") or {0: ""})
        if num_labels != 1:
            raise CheckpointError(
                f"sequence-classification checkpoints need 1 label, this one has {num_labels}"
            )
        return "score"
    return "lm"


def _flat(state: nnx.State) -> list[tuple[tuple[str, ...], nnx.Variable]]:
    return [(tuple(str(k) for k in p), var) for p, var in nnx.to_flat_state(state)]


def _read_param(
    reader: _SafetensorsReader, keys: list[str], kind: str, shape: tuple[int, ...], stacked: bool, where: str
) -> np.ndarray:
    """Reads and converts one parameter; block parameters are stacked over layers."""
    per_layer = shape[1:] if stacked else shape
    expected = _hf_shape(per_layer, kind)
    arrays = []
    for key in keys:
        if key not in reader:
            raise CheckpointError(
                f"{where}: tensor {key!r} is missing from the checkpoint, but {where}/config.json needs it: "
                "are the weights and config.json from different models (another family or size)?"
            )
        x = reader.get(key)
        if tuple(x.shape) != expected:
            raise CheckpointError(
                f"{where}: tensor {key!r} has shape {tuple(x.shape)} but config.json implies {expected}"
            )
        arrays.append(_to_ours(x, per_layer, kind))
    return np.stack(arrays) if stacked else arrays[0]


def _place(x: np.ndarray, sharding) -> jax.Array:
    if sharding is None:
        return jnp.asarray(x)
    # Each device receives only its own slice: a sharded model never sits whole on one device.
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _new_head_param(p: tuple[str, ...], shape: tuple[int, ...], dtype) -> np.ndarray:
    if p[-1] == "bias":
        return np.zeros(shape, dtype)
    return (INIT_STD * np.random.default_rng(0).standard_normal(shape)).astype(dtype)


def load_hf(
    path: str | os.PathLike,
    *,
    dtype=jnp.float32,
    compute_dtype=None,
    mesh: Mesh | None = None,
    head: str | None = None,
    rules=DEFAULT_RULES,
    **overrides,
):
    """Reads an HF checkpoint directory into a model whose parameters are ``dtype`` (sharded on ``mesh``).

    The model computes in ``compute_dtype`` (default: ``dtype``); logits are float32 either way.
    ``head`` defaults to the checkpoint's own (``*ForCausalLM`` -> "lm", ``*ForSequenceClassification``
    -> "score"); asking for a head the checkpoint lacks (a reward head on a base model) initialises that
    head randomly, as HF does, and logs it. ``overrides`` replace :class:`ModelConfig` fields (compute
    ``remat``, ``scan_layers``, ...).
    """
    path = checkpoint_dir(path)
    hf = read_hf_config(path)
    head = head or _head_from_hf(hf)
    dtype_name = jnp.dtype(dtype).name
    compute_name = jnp.dtype(compute_dtype or dtype).name
    cfg = from_hf_config(hf, param_dtype=dtype_name, dtype=compute_name, **overrides)
    reader = _SafetensorsReader(path)
    graphdef, abstract = nnx.split(abstract_model(cfg, head=head))
    shardings = dict(_flat(state_shardings(abstract, mesh, rules))) if mesh is not None else {}
    used: set[str] = set()
    loaded = []
    for p, var in _flat(abstract):
        keys, kind = hf_keys(p, cfg)
        if p in _HEAD_PATHS and keys[0] not in reader:
            log.warning("%s: no %r tensor; the %s head starts from random init", path, keys[0], p[0])
            array = _new_head_param(p, var.shape, var.dtype)
        else:
            array = _read_param(reader, keys, kind, var.shape, p[0] == "blocks", str(path)).astype(var.dtype)
            used.update(keys)
        sharding = shardings[p].get_value() if p in shardings else None
        loaded.append((p, var.replace(_place(array, sharding))))
    unused = [k for k in reader.weight_map if k not in used and not k.endswith(_IGNORED_SUFFIXES)]
    dropped = [k for k in unused if k.startswith(_OPTIONAL_HEAD_PREFIXES)]
    if dropped:  # e.g. a tied checkpoint that also stores lm_head, or a score head when loading head="lm"
        log.info("%s: not loading %s", path, ", ".join(dropped))
    unexpected = [k for k in unused if k not in dropped]
    if unexpected:
        raise CheckpointError(
            f"{path}: {len(unexpected)} tensors have no place in a {cfg.family} model with this config.json "
            f"(an unsupported feature?): {', '.join(unexpected[:8])}"
        )
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def _architecture(head: str, hf: dict) -> list[str]:
    causal = hf["architectures"][0]
    if head != "score":
        return [causal]
    # Gemma 3's text-only classifier has its own class; Gemma3ForSequenceClassification is multimodal.
    return [
        causal.replace("Gemma3ForCausalLM", "Gemma3TextForCausalLM").replace(
            "ForCausalLM", "ForSequenceClassification"
        )
    ]


GENERATION_CONFIG = "generation_config.json"


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """The special ids an export declares, so that HF transformers stops and pads as this project does.

    Attributes:
      bos: the beginning-of-sequence id; None keeps the model config's (unknown, or none).
      eos: every id that ends a generated answer: the tokenizer's EOS ids and the chat template's
        end-of-turn id (``jaxrl_llm.rollout.text.end_of_turn_ids``); empty keeps the model config's.
      pad: the padding id (HF's sequence classifiers find each row's last token through it, and refuse
        batches above 1 without one); None keeps the model config's.
    """

    bos: int | None = None
    eos: tuple[int, ...] = ()
    pad: int | None = None

    def __post_init__(self):
        for name, value in (("bos", self.bos), ("pad", self.pad), *(("eos", i) for i in self.eos)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"TokenIds.{name}: expected a token id (an int >= 0), got {value!r}")


def _with_token_ids(hf: dict, ids: TokenIds | None) -> dict:
    """``hf`` (config.json) with the ids of ``ids`` that are known; one EOS id as an int, several as a list."""
    if ids is None:
        return hf
    known = {"bos_token_id": ids.bos, "pad_token_id": ids.pad}
    if ids.eos:
        eos = list(dict.fromkeys(ids.eos))
        known["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return {**hf, **{k: v for k, v in known.items() if v is not None}}


def generation_config(hf: dict) -> dict | None:
    """The ``generation_config.json`` HF ``generate`` reads its stop and pad ids from, for a ``config.json``
    dict; None when the config names no EOS id. Greedy-neutral: no sampling settings (HF's defaults are
    greedy decoding), only ``bos_token_id``, ``eos_token_id`` and ``pad_token_id``."""
    if hf.get("eos_token_id") is None:
        return None
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: hf[k] for k in keys if hf.get(k) is not None}


def save_hf(
    model,
    path: str | os.PathLike,
    *,
    token_ids: TokenIds | None = None,
    dtype=None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Writes ``config.json``, ``generation_config.json`` and safetensors (sharded past ``max_shard_bytes``)
    that HF transformers loads.

    ``token_ids`` (the tokenizer's and chat template's, which the model config does not know) set
    ``bos_token_id``, ``eos_token_id`` and ``pad_token_id``; without them, or for ids they leave unknown, the
    model config's are written (those of the checkpoint it was loaded from, else null). Without an EOS id
    HF ``generate`` runs past the end of the turn, so ``generation_config.json`` is written only with one.
    ``dtype`` (e.g. ``jnp.bfloat16``) converts on the way out; the default keeps the parameter dtype. In a
    multi-process run every process must call it (parameters are gathered collectively); process 0 writes
    and the others wait for it.
    """
    path = Path(path)
    cfg: ModelConfig = model.cfg
    head = "score" if hasattr(model, "score") else "lm"
    tensors: dict[str, np.ndarray] = {}
    for p, var in _flat(nnx.state(model, nnx.Param)):
        keys, kind = hf_keys(p, cfg)
        array = to_host(var.get_value())
        if dtype is not None:
            array = array.astype(jnp.dtype(dtype))
        per_layer = list(array) if p[0] == "blocks" else [array]
        for key, x in zip(keys, per_layer, strict=True):
            tensors[key] = _to_hf(x, kind)
    hf = _with_token_ids(to_hf_config(cfg), token_ids)
    hf["architectures"] = _architecture(head, hf)
    if head == "score":
        hf["id2label"], hf["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
    hf["torch_dtype"] = hf["dtype"] = jnp.dtype(dtype or cfg.param_dtype).name
    if is_main_process():
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        generation = generation_config(hf)
        if generation is not None:
            (path / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")
        _write_safetensors(tensors, path, max_shard_bytes)
    barrier(f"save_hf {path}")  # no process reads the export before process 0 has written it
    return path


def _write_safetensors(tensors: dict[str, np.ndarray], path: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, x in tensors.items():
        if shards[-1] and size + x.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = x
        size += x.nbytes
    metadata = {"format": "pt"}  # HF's loaders expect this marker
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(x.nbytes for x in tensors.values())}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
