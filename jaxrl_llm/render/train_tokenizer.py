"""Training a small byte-level BPE tokenizer in-process, saved as an HF tokenizer directory.

For the quickstart and tests, where nothing can be downloaded: the result loads with ``load_tokenizer``
and ``transformers.AutoTokenizer`` like any Hub tokenizer, ChatML template included.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

BOS = "<|begin_of_text|>"
EOS = "<|im_end|>"
PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
# Trained first, so they get ids 0..3 in this order.
SPECIAL_TOKENS = (PAD, IM_START, EOS, BOS)

# The ChatML template of Qwen2.5, without its tool-calling branches.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_byte_level_bpe(
    texts: Iterable[str], *, vocab_size: int = 320, add_bos: bool = True, split_digits: bool = False
):
    """A GPT-2 style byte-level BPE over ``texts`` with ``SPECIAL_TOKENS`` (returns a ``tokenizers.Tokenizer``).

    With ``add_bos`` the post-processor prepends BOS when special tokens are requested. With
    ``split_digits`` every digit is its own pre-token, so no token holds two digits (as in Qwen tokenizers;
    Llama 3 groups at most three), which makes arithmetic learnable by small models.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
        )
    return tok


def save_hf_tokenizer(
    tok,
    out: str | Path,
    *,
    chat_template: str | None = CHATML_TEMPLATE,
    pad: bool = True,
    template_in_config: bool = True,
) -> Path:
    """Writes ``tok`` as an HF tokenizer directory with ChatML special tokens and ``chat_template``.

    ``template_in_config`` stores the template inside ``tokenizer_config.json``, as most Hub models ship it,
    rather than in the ``chat_template.jinja`` file transformers 5 writes.
    """
    from transformers import PreTrainedTokenizerFast

    out = Path(out)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD if pad else None
    )
    hf.chat_template = chat_template
    hf.save_pretrained(str(out))
    if chat_template is not None and template_in_config:
        (out / "chat_template.jinja").unlink()
        config_path = out / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["chat_template"] = chat_template
        config_path.write_text(json.dumps(config, indent=2))
    return out
