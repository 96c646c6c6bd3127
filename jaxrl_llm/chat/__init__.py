"""``python -m jaxrl_llm.chat CHECKPOINT``: talk to a trained model in the terminal (streaming, ``/reset``,
``/system``), or ``--prompt TEXT`` for one answer. In process, over the server's ``serve.Service``: the same
renderer (the run's chat template), engine and text stream as ``python -m jaxrl_llm.serve``."""

from .session import ChatSession

__all__ = ["ChatSession"]
