"""The base config: every key at its default.

Each key's comment (what it means, its default and what it allows) lives in the field table,
jaxrl_llm/config/schema.py, which is the one source of truth; `python -m jaxrl_llm.config` prints it.
Start other configs from ``base_config()`` and change only what differs.
"""

import ml_collections

from jaxrl_llm.config import base_config


def get_config() -> ml_collections.ConfigDict:
    return base_config()
