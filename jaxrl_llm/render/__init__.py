"""The render layer turns chat messages into token ids and loss masks.

``load_tokenizer`` reads an HF tokenizer directory or a SentencePiece ``.model`` file into one
:class:`Tokenizer` interface; a :class:`Renderer` renders canonical messages through the tokenizer's own
chat template or a built-in one (``TEMPLATES``) into ``Rendered(ids, loss_mask)`` for training and a
generation prompt for rollout and serving, and checks their train/inference parity (``Renderer.check``,
``check_parity_sample`` over a dataset).
"""

from .records import (
    KTOEncoder,
    PairEncoder,
    ParityReport,
    SFTEncoder,
    check_parity_sample,
    parity_report,
    token_lengths,
)
from .render import MASK_MODES, Rendered, Renderer, template_messages, template_tools
from .templates import TEMPLATES, RenderError, Template, UnknownTemplateError, get_template
from .tokenizer import Tokenizer, TokenizerError, load_tokenizer

__all__ = [
    "MASK_MODES",
    "TEMPLATES",
    "ParityReport",
    "RenderError",
    "Rendered",
    "KTOEncoder",
    "PairEncoder",
    "SFTEncoder",
    "Renderer",
    "Template",
    "Tokenizer",
    "TokenizerError",
    "UnknownTemplateError",
    "check_parity_sample",
    "get_template",
    "load_tokenizer",
    "parity_report",
    "template_messages",
    "template_tools",
    "token_lengths",
]
