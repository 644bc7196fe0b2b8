"""The one error type users see: a message that names the problem and the fix."""


class RaymedError(Exception):
    """A user-facing failure; the CLI prints its message on one line and exits non-zero."""
