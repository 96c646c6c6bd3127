"""The one base class for mistakes a user can fix.

Every layer raises its own subclass (``ConfigError``, ``MeshError``, ``TokenizerError``,
``ModelConfigError``, ``CheckpointError``, ...) with a message naming what is wrong and where. Entry points
catch ``UserError`` once, print the message and exit with status 2, with no traceback; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A configuration, path, data, checkpoint or request mistake; the message says what and where."""


EXIT_USER_ERROR = 2
