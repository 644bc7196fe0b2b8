"""The one error type users see: a message that names the problem and the fix."""


class RaymedError(Exception):
    """A user-facing failure; the CLI prints its message on one line and exits non-zero."""


def last_line(error) -> str:
    """The last non-blank line of an error's text (a remote traceback ends with its cause)."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
