"""The inference sanity check, ``python -m jaxrl_llm.sanity RUN_DIR_OR_HF_DIR`` (see ``__main__``): a checkpoint
loaded in HF transformers and compared with this project's model (``checks``), proof that an export is sound
independently of this codebase."""

from .checks import DEFAULT_ATOL, DEFAULT_PROMPTS, Check, Report, SanityError, Settings, run_checks

__all__ = ["DEFAULT_ATOL", "DEFAULT_PROMPTS", "Check", "Report", "SanityError", "Settings", "run_checks"]
