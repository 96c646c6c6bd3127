"""Serving: ``python -m jaxrl_llm.serve --checkpoint DIR``, an OpenAI-compatible HTTP server over the
continuous-batching engine (``rollout.engine``), rendering with exactly the chat template the model was
trained with.

Modules: ``service`` (the model, renderer and engine; prompts and settings in, streams of text pieces out),
``textstream`` (incremental detokenization and stop strings), ``toolcalls`` (``<tool_call>`` blocks back
into ``tool_calls``), ``schemas`` (the pydantic request models), ``responses`` (OpenAI's response shapes),
``app`` (the FastAPI routes and error handling). The chat CLI (``jaxrl_llm.chat``) uses the same service.
"""

from .schemas import APIError
from .service import Piece, Service, Settings
from .textstream import TextStream
from .toolcalls import split_tool_calls

__all__ = ["APIError", "Piece", "Service", "Settings", "TextStream", "split_tool_calls"]
