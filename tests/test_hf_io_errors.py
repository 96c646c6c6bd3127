"""Every way an HF checkpoint directory can be wrong gets an error naming the path and the problem."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxrl_llm.models import CheckpointError, ModelConfigError, create_model, get_preset, load_hf, save_hf


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    save_hf(create_model(get_preset("llama-tiny")), path)
    return path


def _copy(checkpoint, tmp_path, *, config=None, tensors=None):
    hf = json.loads((checkpoint / "config.json").read_text())
    weights = load_file(str(checkpoint / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config(hf) if config else hf))
    save_file(tensors(weights) if tensors else weights, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_bad_path(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nope'}: not a directory"):
        load_hf(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=f"{tmp_path}: no config.json"):
        load_hf(tmp_path)


def test_hub_ids_are_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="Qwen/Qwen3-8B: not a directory.*Hub ids are not downloaded"):
        load_hf("Qwen/Qwen3-8B")


def test_multimodal_gemma3_is_named(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path, config=lambda hf: {**hf, "model_type": "gemma3", "text_config": {}})
    with pytest.raises(ModelConfigError, match="multimodal Gemma 3 checkpoint"):
        load_hf(path)


def test_tensors_the_model_would_ignore_are_an_error(checkpoint, tmp_path):
    def add_bias(w):  # an o_proj bias the config does not announce: loading it silently would be wrong
        w["model.layers.0.self_attn.o_proj.bias"] = np.zeros((64,), np.float32)
        return w

    path = _copy(checkpoint, tmp_path, tensors=add_bias)
    with pytest.raises(CheckpointError, match=r"1 tensors have no place in a llama model.*o_proj.bias"):
        load_hf(path)


def test_unsupported_architecture(checkpoint, tmp_path):
    path = _copy(
        checkpoint,
        tmp_path,
        config=lambda hf: {**hf, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
    )
    with pytest.raises(
        ModelConfigError, match=r"model_type='gpt2' \(architectures=\['GPT2LMHeadModel'\]\) is not supported"
    ):
        load_hf(path)


def test_missing_tensor(checkpoint, tmp_path):
    path = _copy(
        checkpoint,
        tmp_path,
        tensors=lambda w: {k: v for k, v in w.items() if "layers.1.mlp.up_proj" not in k},
    )
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' is missing"):
        load_hf(path)


def test_misshaped_tensor(checkpoint, tmp_path):
    def shrink(w):
        w["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 64), np.float32)
        return w

    path = _copy(checkpoint, tmp_path, tensors=shrink)
    with pytest.raises(
        CheckpointError,
        match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(8, 64\) but config.json implies \(32, 64\)",
    ):
        load_hf(path)


def test_missing_weights_file_and_pytorch_bin(checkpoint, tmp_path):
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(
        CheckpointError, match="no model.safetensors.*PyTorch .bin checkpoints are not supported"
    ):
        load_hf(tmp_path)


def test_broken_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_hf(tmp_path)


def test_missing_config_field(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path, config=lambda hf: {k: v for k, v in hf.items() if k != "hidden_size"})
    with pytest.raises(ModelConfigError, match="missing required field 'hidden_size'"):
        load_hf(path)


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # a copy cut short
        lambda data: b"",  # an empty file
        lambda data: b"<html>not found</html>" * 50,  # an error page saved under the name
    ],
    ids=["truncated", "empty", "garbage"],
)
def test_a_damaged_safetensors_file_is_named(checkpoint, tmp_path, damage):
    path = _copy(checkpoint, tmp_path)
    weights = path / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(
        CheckpointError, match=f"{weights}: not a readable safetensors file .*truncated or corrupt"
    ):
        load_hf(path)


def test_a_damaged_safetensors_index_is_named(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path)
    (path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not a safetensors index"):
        load_hf(path)
