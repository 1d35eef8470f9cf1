"""The one error type for mistakes a user can fix.

``python -m avmt`` turns a :class:`UserError` into one line on stderr (``avmt: error: ...``) and exit
status 2; every other exception keeps its traceback, because it is a bug to report. Raise it with
a message that names what to fix: the config key, the file, or the sample.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """A mistake in the user's config, files or data, with a message naming the key, file or sample.

    A ``ValueError`` subclass, so code that validates arguments and catches ``ValueError`` keeps working.
    """
