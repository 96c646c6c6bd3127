"""load_tokenizer over tokenizers trained in-process: HF directories (three layouts) and SentencePiece files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece

from jaxrl_llm.render import Tokenizer, TokenizerError, load_tokenizer
from tests.fixtures_tokenizers import (
    BOS,
    BOS_EOS_TEMPLATE,
    CHATML_TEMPLATE,
    EOS,
    IM_START,
    PAD,
    make_hf_tokenizer_dir,
    make_qwen_style_dir,
    make_sentencepiece_dir,
    make_sentencepiece_model,
)

CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
CHATML_CONVERSATION = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
TEXT = "Hello world, the answer is 42. Ünïcödé ✓"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_tokenizer_dir(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sentencepiece_model(tmp_path_factory.mktemp("sp"))


# --- HF directories -----------------------------------------------------------------------------------


def test_hf_dir_encode_decode_round_trip(hf_dir: Path) -> None:
    tok = load_tokenizer(hf_dir)
    assert isinstance(tok, Tokenizer)
    assert tok.kind == "hf" and tok.hf is not None and tok.sp is None
    assert tok.name_or_path == str(hf_dir)
    ids = tok.encode(TEXT)
    assert ids == tok.hf.encode(TEXT, add_special_tokens=False)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == TEXT
    assert tok.decode(np.asarray(ids, dtype=np.int32)) == TEXT
    assert tok.encode(TEXT, add_special_tokens=True) == [tok.bos_id, *ids]


def test_hf_dir_special_ids(hf_dir: Path) -> None:
    tok = load_tokenizer(hf_dir)
    # The fixture trains the special tokens first, so their ids are fixed.
    assert [tok.token_to_id(t) for t in (PAD, IM_START, EOS, BOS)] == [0, 1, 2, 3]
    assert tok.token_to_id("definitely-not-a-token") is None
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (3, 2, 0)
    assert tok.eos_ids == (2,)
    assert tok.vocab_size == 320 == len(tok.hf)
    ids = tok.encode(f"{IM_START}user\nHi{EOS}")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == f"{IM_START}user\nHi{EOS}"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHi"


@pytest.mark.parametrize("template_in", ["tokenizer_config", "jinja_file"])
def test_hf_chat_template_renders(tmp_path: Path, template_in: str) -> None:
    directory = make_hf_tokenizer_dir(tmp_path, template_in=template_in)
    # Hub models keep the template in tokenizer_config.json; transformers 5 saves chat_template.jinja.
    assert (directory / "chat_template.jinja").exists() == (template_in == "jinja_file")
    tok = load_tokenizer(directory)
    assert tok.chat_template == CHATML_TEMPLATE
    assert tok.apply_chat_template(CONVERSATION) == CHATML_CONVERSATION
    rendered = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    assert rendered == CHATML_CONVERSATION + "<|im_start|>assistant\n"


def test_chat_template_argument_overrides_and_sha256_tracks_it(hf_dir: Path) -> None:
    tok = load_tokenizer(hf_dir)
    assert tok.template_sha256 == hashlib.sha256(CHATML_TEMPLATE.encode()).hexdigest()
    assert load_tokenizer(hf_dir).template_sha256 == tok.template_sha256

    override = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    other = load_tokenizer(hf_dir, chat_template=override)
    assert other.chat_template == override
    assert other.apply_chat_template(CONVERSATION) == "user: Hi\nassistant: Hello!\n"
    assert other.template_sha256 == hashlib.sha256(override.encode()).hexdigest() != tok.template_sha256


def test_hf_without_template_or_pad(tmp_path: Path) -> None:
    tok = load_tokenizer(make_hf_tokenizer_dir(tmp_path, chat_template=None, pad=False))
    assert tok.chat_template is None and tok.template_sha256 is None
    assert tok.hf.pad_token_id is None
    assert tok.pad_id == tok.eos_id == 2
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template(CONVERSATION)


def test_generation_config_eos_ids_are_merged(tmp_path: Path) -> None:
    directory = make_hf_tokenizer_dir(tmp_path, generation_eos_ids=[0, 2])
    tok = load_tokenizer(directory)
    assert tok.eos_id == 2
    assert tok.eos_ids == (2, 0)

    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    assert load_tokenizer(directory).eos_ids == (2, 1)

    (directory / "generation_config.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="generation_config.json"):
        load_tokenizer(directory)


def test_qwen_style_vocab_and_merges_dir(tmp_path: Path, hf_dir: Path) -> None:
    directory = make_qwen_style_dir(tmp_path)
    assert not (directory / "tokenizer.json").exists()
    tok = load_tokenizer(directory)
    reference = load_tokenizer(hf_dir)
    # Qwen2Tokenizer pre-splits digits one by one where the fixture's GPT-2 regex does not, so the ids are
    # compared on words only.
    words = f"{IM_START}user\nThe quick brown fox jumps over the lazy dog.{EOS}"
    assert tok.encode(words) == reference.encode(words)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (None, 2, 0, 320)
    assert tok.apply_chat_template(CONVERSATION) == CHATML_CONVERSATION


def test_llama2_style_sentencepiece_dir(tmp_path: Path) -> None:
    directory = make_sentencepiece_dir(tmp_path)
    tok = load_tokenizer(directory)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    assert tok.kind == "hf"
    # For characters outside the tiny corpus sentencepiece emits <unk> where the converted HF tokenizer
    # drops them (the model has no byte fallback), so the ids are compared on corpus text.
    text = "Hello world, the quick brown fox jumps over the lazy dog."
    assert tok.encode(text) == sp.encode(text)
    assert tok.encode(text, add_special_tokens=True) == [sp.bos_id(), *sp.encode(text)]
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (sp.bos_id(), sp.eos_id(), sp.get_piece_size())


# --- SentencePiece .model files ---------------------------------------------------------------------


def test_sentencepiece_round_trip_matches_sentencepiece(sp_model: Path) -> None:
    tok = load_tokenizer(sp_model)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    assert tok.kind == "sentencepiece" and tok.sp is not None and tok.hf is None
    ids = tok.encode(TEXT)
    assert ids == sp.encode(TEXT)
    assert tok.decode(ids) == sp.decode(ids)
    assert tok.decode(tok.encode("Hello world")) == "Hello world"
    assert tok.encode("Hello world", add_special_tokens=True) == [1, *sp.encode("Hello world")]
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    # The model has no pad piece, so padding uses EOS.
    assert tok.pad_id == 2 and tok.eos_ids == (2,)
    assert tok.vocab_size == sp.get_piece_size() == 120


def test_sentencepiece_special_pieces(sp_model: Path) -> None:
    tok = load_tokenizer(sp_model)
    ids = [1, *tok.encode("Hello world"), 2]
    assert tok.decode(ids) == "<s>Hello world</s>"
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world"
    assert tok.token_to_id(EOS) == tok.encode(EOS)[-1]
    assert tok.token_to_id("<unk>") == 0
    assert tok.token_to_id("definitely-not-a-piece") is None


def test_sentencepiece_chat_template(sp_model: Path, hf_dir: Path) -> None:
    tok = load_tokenizer(sp_model, chat_template=BOS_EOS_TEMPLATE)
    assert tok.apply_chat_template(CONVERSATION) == "<s>[user] Hi</s>[assistant] Hello!</s>"
    assert (
        tok.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True)
        == "<s>[user] Hi</s>[assistant] "
    )
    assert tok.template_sha256 == hashlib.sha256(BOS_EOS_TEMPLATE.encode()).hexdigest()
    # The same template gives the same text through either backend.
    chatml = load_tokenizer(sp_model, chat_template=CHATML_TEMPLATE)
    assert chatml.apply_chat_template(CONVERSATION) == load_tokenizer(hf_dir).apply_chat_template(
        CONVERSATION
    )


def test_sentencepiece_without_template_raises(sp_model: Path) -> None:
    tok = load_tokenizer(sp_model)
    assert tok.chat_template is None and tok.template_sha256 is None
    with pytest.raises(TokenizerError, match="no chat template") as info:
        tok.apply_chat_template(CONVERSATION)
    assert str(sp_model) in str(info.value)


# --- errors a user can cause ----------------------------------------------------------------------------


def _error(path: Path) -> str:
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(path)
    message = str(info.value)
    assert str(path) in message
    return message


def test_missing_path(tmp_path: Path) -> None:
    assert "does not exist" in _error(tmp_path / "nope")


def test_directory_without_tokenizer_files(tmp_path: Path) -> None:
    message = _error(tmp_path)
    assert (
        "tokenizer.json" in message and "vocab.json + merges.txt" in message and "tokenizer.model" in message
    )

    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "spm.model").write_bytes(b"")
    assert "spm.model" in _error(tmp_path)


def test_wrong_file_type(tmp_path: Path, hf_dir: Path) -> None:
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello")
    assert "SentencePiece .model" in _error(text_file)
    # Pointing at a file inside an HF directory names the directory to pass instead.
    assert f"pass its directory {hf_dir}" in _error(hf_dir / "tokenizer.json")


def test_corrupt_sentencepiece_model(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"\x00not a sentencepiece model\xff")
    assert "could not load SentencePiece model" in _error(corrupt)


def test_corrupt_tokenizer_json(tmp_path: Path) -> None:
    directory = make_hf_tokenizer_dir(tmp_path)
    (directory / "tokenizer.json").write_text("{not json")
    assert f"{directory / 'tokenizer.json'}: not valid JSON" in _error(directory)  # the file, not the dir


def test_errors_are_value_errors() -> None:
    assert issubclass(TokenizerError, ValueError)
