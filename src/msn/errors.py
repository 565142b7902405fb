"""The one exception type for mistakes a user can make.

The CLI prints its message as a single line and exits non-zero; library callers get
an ordinary ``ValueError`` subclass they can catch.
"""


class MsnError(ValueError):
    """A user-facing error: the message names the problem and the fix."""


class MsnInterrupted(KeyboardInterrupt):
    """Ctrl-C during long work; the message says how to continue (the CLI exits 130)."""
