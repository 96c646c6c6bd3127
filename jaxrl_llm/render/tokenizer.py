"""One tokenizer interface over HF tokenizer directories and SentencePiece ``.model`` files.

``load_tokenizer(path)`` picks the backend from what is on disk and returns a :class:`Tokenizer`: plain
``list[int]`` ids, the special ids a trainer and a sampler need (``eos_ids`` for stopping, ``pad_id`` for
batching) and the chat template rendered to text. The rendering layer builds ids and loss masks on top.
Nothing here downloads: HF directories load with ``local_files_only=True``.
"""

from __future__ import annotations

import abc
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import sentencepiece

from jaxrl_llm.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Message = Mapping[str, Any]

# What makes a directory an HF tokenizer, in the order the error message lists it.
_HF_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))
_HF_ONLY_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
)


class TokenizerError(UserError):
    """A tokenizer path that cannot be loaded, or a chat request the tokenizer cannot serve."""


class Tokenizer(abc.ABC):
    """The tokenizer our other layers use, whichever library sits underneath.

    Attributes:
      kind: ``"hf"`` (``.hf`` holds the ``PreTrainedTokenizerBase``) or ``"sentencepiece"`` (``.sp`` holds
        the ``SentencePieceProcessor``); the other attribute is ``None``.
      name_or_path: where it was loaded from.
      eos_ids: every id that ends a generation: ``eos_id`` first, then for HF directories the
        ``eos_token_id`` of ``generation_config.json`` (chat models such as Qwen and Llama 3 stop on several).
    """

    kind: ClassVar[Literal["hf", "sentencepiece"]]
    hf: PreTrainedTokenizerBase | None = None
    sp: sentencepiece.SentencePieceProcessor | None = None

    def __init__(self, name_or_path: str, extra_eos_ids: Iterable[int] = ()) -> None:
        self.name_or_path = name_or_path
        eos = [] if self.eos_id is None else [self.eos_id]
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys([*eos, *extra_eos_ids]))

    @abc.abstractmethod
    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds what the tokenizer puts around a sequence (BOS)."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list or a 1-D integer array)."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary entry, or ``None`` when it is not in the vocabulary."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the embedding table needs at least this many rows)."""

    @property
    @abc.abstractmethod
    def bos_id(self) -> int | None:
        """The beginning-of-sequence id, or ``None`` (Qwen and other ChatML models have none)."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int | None:
        """The tokenizer's own end-of-sequence id; stop generation on ``eos_ids``, which may hold more."""

    @property
    @abc.abstractmethod
    def _own_pad_id(self) -> int | None: ...

    @property
    def pad_id(self) -> int | None:
        """The padding id; the EOS id when the tokenizer defines none (padded positions are masked anyway)."""
        pad = self._own_pad_id
        return self.eos_id if pad is None else pad

    @property
    @abc.abstractmethod
    def chat_template(self) -> str | None:
        """The Jinja chat template text, or ``None`` when the tokenizer has none."""

    @abc.abstractmethod
    def apply_chat_template(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` (``{"role": ..., "content": ...}`` dicts) to text with the chat template.

        ``add_generation_prompt`` appends the header that opens the assistant's turn; ``tools`` (JSON schemas)
        and ``kwargs`` are passed to the template; ``chat_template`` (Jinja text) is used instead of the
        tokenizer's own, through the same renderer and special-token variables (the built-in templates of
        ``jaxrl_llm.render.templates`` come this way). Raises ``TokenizerError`` when there is no template.
        """

    @property
    def template_sha256(self) -> str | None:
        """sha256 hex digest of the chat template, recorded with a run so its prompts can be reproduced."""
        template = self._template_identity()
        return None if template is None else hashlib.sha256(template.encode("utf-8")).hexdigest()

    def _template_identity(self) -> str | None:
        return self.chat_template

    def check_fits(self, model_vocab_size: int) -> None:
        """Raises when some ids of this tokenizer have no row in a model's embedding table."""
        if self.vocab_size > model_vocab_size:
            raise TokenizerError(
                f"tokenizer {self.name_or_path} has {self.vocab_size} ids but the model's vocab_size is "
                f"{model_vocab_size}: ids >= {model_vocab_size} would index past the embedding table"
            )

    def _no_template_error(self) -> TokenizerError:
        return TokenizerError(
            f"tokenizer {self.name_or_path} has no chat template: pass one with "
            "load_tokenizer(path, chat_template=...)"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size})"


class HFTokenizer(Tokenizer):
    """A ``transformers`` tokenizer loaded from a directory."""

    kind = "hf"
    hf: PreTrainedTokenizerBase

    def __init__(self, hf: PreTrainedTokenizerBase, name_or_path: str, extra_eos_ids: Iterable[int] = ()):
        self.hf = hf
        super().__init__(name_or_path, extra_eos_ids)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        token_id = self.hf.convert_tokens_to_ids(token)
        # HF maps unknown tokens to the UNK id when the vocabulary has one.
        if token_id is None or (token_id == self.hf.unk_token_id and token != self.hf.unk_token):
            return None
        return int(token_id)

    @property
    def vocab_size(self) -> int:
        # `hf.vocab_size` leaves out added tokens such as <|im_end|>.
        return len(self.hf)

    @property
    def bos_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def eos_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def _own_pad_id(self) -> int | None:
        return self.hf.pad_token_id

    @property
    def chat_template(self) -> str | None:
        """The template text; for a tokenizer with named templates, the one named ``default``."""
        template = self.hf.chat_template
        if isinstance(template, dict):
            return template.get("default")
        return template

    def _template_identity(self) -> str | None:
        template = self.hf.chat_template
        if isinstance(template, dict):
            # Named templates (e.g. "default" + "tool_use") are all part of what a run renders with.
            return json.dumps(template, sort_keys=True)
        return template

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        if chat_template is None and self.hf.chat_template is None:
            raise self._no_template_error()
        return self.hf.apply_chat_template(
            [dict(m) for m in messages],
            tools=None if tools is None else list(tools),
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **kwargs,
        )


class SentencePieceTokenizer(Tokenizer):
    """A bare SentencePiece model; "special" ids are its control pieces (BOS, EOS, PAD)."""

    kind = "sentencepiece"
    sp: sentencepiece.SentencePieceProcessor

    def __init__(
        self, sp: sentencepiece.SentencePieceProcessor, name_or_path: str, chat_template: str | None
    ):
        self.sp = sp
        self._chat_template = chat_template
        self._control_ids = {
            sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i) and sp.id_to_piece(i)
        }
        pieces = sorted(self._control_ids, key=len, reverse=True)
        self._control_pattern = re.compile(f"({'|'.join(map(re.escape, pieces))})") if pieces else None
        super().__init__(name_or_path)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        # Like HF's Llama tokenizer: special tokens means a leading BOS, no EOS.
        ids = [self.bos_id] if add_special_tokens and self.bos_id is not None else []
        # sentencepiece never matches control pieces in text, but a rendered chat holds the template's
        # "<s>"/"</s>": map each to its id, as HF tokenizers do, rather than spelling it out in pieces.
        for part in self._control_pattern.split(text) if self._control_pattern else [text]:
            if part in self._control_ids:
                ids.append(self._control_ids[part])
            elif part:
                ids += self.sp.encode(part)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if not self.sp.is_control(i)])
        # sentencepiece drops control pieces when decoding; write them out so that, as with HF, only
        # skip_special_tokens=True hides them.
        parts, run = [], []
        for i in ids:
            if self.sp.is_control(i):
                parts += [self.sp.decode(run), self.sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        parts.append(self.sp.decode(run))
        return "".join(parts)

    def token_to_id(self, token: str) -> int | None:
        token_id = self.sp.piece_to_id(token)
        if self.sp.is_unknown(token_id) and token != self.sp.id_to_piece(token_id):
            return None
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int | None:
        return _sp_id(self.sp.bos_id())

    @property
    def eos_id(self) -> int | None:
        return _sp_id(self.sp.eos_id())

    @property
    def _own_pad_id(self) -> int | None:
        return _sp_id(self.sp.pad_id())

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        template = self._chat_template if chat_template is None else chat_template
        if template is None:
            raise self._no_template_error()
        # HF's renderer, so a template renders the same text here as through an HF tokenizer: same sandbox,
        # same filters (tojson, raise_exception), same special-token variables.
        from transformers.utils.chat_template_utils import render_jinja_template

        special = {
            name: self.sp.id_to_piece(token_id)
            for name, token_id in (
                ("bos_token", self.bos_id),
                ("eos_token", self.eos_id),
                ("pad_token", self.pad_id),
            )
            if token_id is not None
        }
        rendered, _ = render_jinja_template(
            conversations=[[dict(m) for m in messages]],
            tools=None if tools is None else list(tools),
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            **{**special, **kwargs},
        )
        return rendered[0]


def _sp_id(token_id: int) -> int | None:
    # sentencepiece reports a disabled special piece as -1.
    return None if token_id < 0 else token_id


def load_tokenizer(path: str | Path, *, chat_template: str | None = None) -> Tokenizer:
    """Load an HF tokenizer directory or a SentencePiece ``.model`` file.

    Args:
      path: a directory holding ``tokenizer.json``, or ``vocab.json`` + ``merges.txt`` (Qwen), or
        ``tokenizer.model`` (Llama 2), with its ``tokenizer_config.json``; or a SentencePiece ``.model`` file.
      chat_template: a Jinja chat template that replaces the directory's own (a ``.model`` file has none).

    Raises:
      TokenizerError: the path does not exist, holds no tokenizer, or the tokenizer files cannot be read.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise TokenizerError(f"tokenizer path does not exist: {path}")
    if path.is_dir():
        return _load_hf_dir(path, chat_template)
    if path.suffix != ".model":
        hint = f"; pass its directory {path.parent}" if path.name in _HF_ONLY_FILES else ""
        raise TokenizerError(f"{path} is neither a tokenizer directory nor a SentencePiece .model file{hint}")
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise TokenizerError(f"could not load SentencePiece model {path}: {e}") from e
    return SentencePieceTokenizer(sp, str(path), chat_template)


def missing_tokenizer_files(path: str | Path) -> str | None:
    """None when directory ``path`` holds a tokenizer's files, else a problem naming what was looked for."""
    path = Path(path)
    if any(all((path / name).is_file() for name in names) for names in _HF_FILE_SETS):
        return None
    looked_for = ", ".join(" + ".join(names) for names in _HF_FILE_SETS)
    models = sorted(p.name for p in path.glob("*.model"))
    hint = f"; to load a SentencePiece file pass its path, e.g. {path / models[0]}" if models else ""
    return f"no tokenizer files in {path}: looked for {looked_for}{hint}"


def _damaged_json(path: Path) -> str | None:
    """The first JSON file of the directory that does not parse, and why (usually a copy cut short)."""
    for file in sorted(path.glob("*.json")):
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:
            return f"{file}: not valid JSON ({e}); the file is truncated or corrupt: copy it again"
    return None


def _load_hf_dir(path: Path, chat_template: str | None) -> HFTokenizer:
    if problem := missing_tokenizer_files(path):
        raise TokenizerError(problem)
    # transformers is imported here, not at module level, because it costs seconds and SentencePiece-only
    # users never need it.
    from transformers import AutoTokenizer

    # Whatever fails inside transformers here comes from a bad directory: report it with the path.
    try:
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        # transformers names neither the file nor the cause of a damaged JSON file
        damaged = _damaged_json(path)
        raise TokenizerError(
            damaged or f"could not load the tokenizer in {path}: {type(e).__name__}: {e}"
        ) from e
    # A tokenizer class that does not match its files can load and then encode everything to no ids
    # (LlamaTokenizer given only a .model file does): fail here rather than train on empty sequences.
    if not hf.encode("Hello world", add_special_tokens=False):
        raise TokenizerError(
            f"the tokenizer in {path} loads but encodes text to no ids; check tokenizer_class"
        )
    if chat_template is not None:
        hf.chat_template = chat_template
    return HFTokenizer(hf, str(path), _generation_eos_ids(path))


def _generation_eos_ids(path: Path) -> list[int]:
    config_path = path / "generation_config.json"
    if not config_path.is_file():
        return []
    try:
        eos = json.loads(config_path.read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as e:
        raise TokenizerError(f"could not read {config_path}: {e}") from e
    if eos is None:
        return []
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) for i in ids):
        raise TokenizerError(f"{config_path}: eos_token_id must be an int or a list of ints, got {eos!r}")
    return ids
