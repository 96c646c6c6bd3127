"""Every way an HF checkpoint directory can be wrong gets an error naming the path and the problem."""

from __future__ import annotations

import json
import shutil

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


# ------------------------------------------------- a bad model.path through a training run: exit 2, one line

RUN = [
    "--config.stage=sft",
    "--config.data.path=synthetic:arithmetic?n=40&digits=2",
    "--config.render.template=chatml",
    "--config.optimizer.warmup_steps=0",
    "--config.train.steps=1",
    "--config.train.batch_size=4",
    "--config.train.seq_len=64",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny HF model directory with its tokenizer, as a previous stage's export holds them."""
    from tests.fixtures_tokenizers import make_hf_tokenizer_dir

    root = tmp_path_factory.mktemp("model")
    path = save_hf(create_model(get_preset("llama-tiny").replace(vocab_size=320)), root / "model")
    for file in make_hf_tokenizer_dir(root, vocab_size=256).iterdir():
        shutil.copy(file, path / file.name)
    return path


def _edit_config(**changes):
    def edit(path):
        hf = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**hf, **changes}))

    return edit


def _truncate(name):
    def cut(path):
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[: len(data) // 2])

    return cut


def _shrink_vocab(path):
    _edit_config(vocab_size=100)(path)
    weights = load_file(str(path / "model.safetensors"))
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[key] = weights[key][:100]
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})


def _as_unfinished_run(path):
    for file in path.iterdir():
        file.unlink()
    (path / "run_info.json").write_text("{}")
    (path / "checkpoints").mkdir()


@pytest.mark.parametrize(
    "damage, expected",
    [
        (
            _edit_config(model_type="gpt2", architectures=["GPT2LMHeadModel"]),
            "config.json: model_type='gpt2' (architectures=['GPT2LMHeadModel']) is not supported",
        ),
        (  # a Qwen3 config.json over Llama weights: Qwen3 has q/k norms
            _edit_config(model_type="qwen3", architectures=["Qwen3ForCausalLM"]),
            "tensor 'model.layers.0.self_attn.k_norm.weight' is missing from the checkpoint, but {path}/config.json "
            "needs it: are the weights and config.json from different models",
        ),
        (
            _edit_config(hidden_size=128),
            "tensor 'model.layers.0.self_attn.k_proj.weight' has shape (32, 64) but config.json implies (32, 128)",
        ),
        (_edit_config(num_hidden_layers=3), "tensor 'model.layers.2.self_attn.k_proj.weight' is missing"),
        (lambda path: (path / "config.json").unlink(), "model.path='{path}': no config.json"),
        (_truncate("config.json"), "{path}/config.json: not valid JSON"),
        (_truncate("model.safetensors"), "{path}/model.safetensors: not a readable safetensors file"),
        (
            lambda path: (path / "tokenizer.json").unlink(),
            "model.path='{path}': no tokenizer files in {path}: looked for tokenizer.json, vocab.json + "
            "merges.txt, tokenizer.model; set tokenizer.path to the model's tokenizer",
        ),
        (_truncate("tokenizer.json"), "{path}/tokenizer.json: not valid JSON"),
        (_shrink_vocab, "has 260 ids but the model's vocab_size is 100: ids >= 100 would index past"),
        (
            _as_unfinished_run,
            "model.path='{path}': a training run's directory without a final HF export (final/)",
        ),
    ],
    ids=[
        "unsupported-family",
        "qwen3-config-llama-weights",
        "shapes-not-config",
        "fewer-layers",
        "no-config-json",
        "truncated-config-json",
        "truncated-weights",
        "no-tokenizer",
        "truncated-tokenizer",
        "vocab-below-tokenizer",
        "unfinished-run",
    ],
)
def test_a_bad_model_path_stops_the_run_with_one_line(model_dir, tmp_path, capsys, damage, expected):
    from jaxrl_llm.train import __main__ as train_main

    path = tmp_path / "model"
    shutil.copytree(model_dir, path)
    damage(path)
    code = train_main.main([*RUN, f"--config.model.path={path}", f"--config.run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected.format(path=path) in err and "Traceback" not in err
