"""Tiny tokenizers trained in-process, for tests that need a real tokenizer on disk without a download.

``make_hf_tokenizer_dir`` writes a byte-level BPE directory laid out by ``save_pretrained`` (ChatML special
tokens and template, like Qwen); ``make_qwen_style_dir`` writes the same vocabulary as ``vocab.json`` +
``merges.txt`` with no ``tokenizer.json``; ``make_sentencepiece_model`` writes a SentencePiece ``.model``.
Each trains in well under a second.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Literal

import sentencepiece

from jaxrl_llm.render.train_tokenizer import (  # noqa: F401 - re-exported for tests
    BOS,
    CHATML_TEMPLATE,
    EOS,
    IM_START,
    PAD,
    SPECIAL_TOKENS,
    save_hf_tokenizer,
)
from jaxrl_llm.render.train_tokenizer import train_byte_level_bpe as _train_bpe

CORPUS = (
    "Hello world, this is a tiny corpus for training tokenizers in tests.",
    "The quick brown fox jumps over the lazy dog.",
    "user: What is 12 + 30? assistant: The answer is 42.",
    "system: You are a helpful assistant. Think step by step.",
    "Reinforcement learning from human feedback trains a policy against a reward.",
) * 8

# A template that reads the special-token variables, for tokenizers whose markers are BOS/EOS pieces.
BOS_EOS_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '[' + message['role'] + '] ' + message['content'] + eos_token }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '[assistant] ' }}{%- endif %}"
)


def train_byte_level_bpe(vocab_size: int = 320):
    """The package's byte-level BPE trained over ``CORPUS``; BOS is added by the post-processor."""
    return _train_bpe(CORPUS, vocab_size=vocab_size)


def make_hf_tokenizer_dir(
    tmp_path: Path,
    *,
    chat_template: str | None = CHATML_TEMPLATE,
    vocab_size: int = 320,
    template_in: Literal["tokenizer_config", "jinja_file"] = "tokenizer_config",
    pad: bool = True,
    generation_eos_ids: list[int] | None = None,
    name: str = "hf_tokenizer",
) -> Path:
    """Save a tiny HF tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) to ``tmp_path / name``.

    Args:
      chat_template: written where ``template_in`` says: inside ``tokenizer_config.json`` as most Hub
        models ship it, or as the ``chat_template.jinja`` file transformers 5 writes; ``None`` for none.
      pad: ``False`` leaves the pad token unset.
      generation_eos_ids: written as ``generation_config.json``'s ``eos_token_id`` when given.
    """
    out = save_hf_tokenizer(
        train_byte_level_bpe(vocab_size),
        tmp_path / name,
        chat_template=chat_template,
        pad=pad,
        template_in_config=template_in == "tokenizer_config",
    )
    if generation_eos_ids is not None:
        (out / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos_ids}))
    return out


def make_qwen_style_dir(tmp_path: Path, *, vocab_size: int = 320, name: str = "qwen_style") -> Path:
    """Write ``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json`` (``Qwen2Tokenizer``), no ``tokenizer.json``."""
    out = tmp_path / name
    out.mkdir(parents=True)
    tok = train_byte_level_bpe(vocab_size)
    tok.model.save(str(out))
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": PAD,
        "chat_template": CHATML_TEMPLATE,
        "errors": "replace",
        "split_special_tokens": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


def make_sentencepiece_model(tmp_path: Path, *, vocab_size: int = 120, name: str = "tiny.model") -> Path:
    """Train a BPE SentencePiece model (unk=0, ``<s>``=1, ``</s>``=2, no pad) and write it to ``tmp_path / name``.

    The ChatML markers are user-defined symbols, so they encode as single pieces.
    """
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        # The corpus is too small for most vocabulary sizes; without this the trainer refuses.
        hard_vocab_limit=False,
        user_defined_symbols=[IM_START, EOS],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    out = tmp_path / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    return out


def make_sentencepiece_dir(tmp_path: Path, *, vocab_size: int = 120, name: str = "sp_dir") -> Path:
    """A Llama 2 style directory: the SentencePiece model as ``tokenizer.model`` + ``tokenizer_config.json``."""
    model = make_sentencepiece_model(tmp_path, vocab_size=vocab_size, name=f"{name}_src.model")
    out = tmp_path / name
    out.mkdir(parents=True)
    shutil.move(model, out / "tokenizer.model")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out
