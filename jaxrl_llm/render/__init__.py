"""The render layer turns chat messages into token ids and loss masks.

This module is its tokenizer part: ``load_tokenizer`` reads an HF tokenizer directory or a SentencePiece
``.model`` file into one :class:`Tokenizer` interface.
"""

from .tokenizer import Tokenizer, TokenizerError, load_tokenizer

__all__ = ["Tokenizer", "TokenizerError", "load_tokenizer"]
