"""Configuration: one field table (``schema``), one validator (``validate``), one command line (``cli``).

Every key, with its default, what it allows and what it means: ``python -m jaxrl_llm.config``.
"""

from .cli import apply_overrides, format_config, load_config, parse_args
from .schema import FIELDS, STAGE_NAMES, Field, base_config, describe
from .validate import ConfigError, validate

__all__ = [
    "FIELDS",
    "STAGE_NAMES",
    "ConfigError",
    "Field",
    "apply_overrides",
    "base_config",
    "describe",
    "format_config",
    "load_config",
    "parse_args",
    "validate",
]
