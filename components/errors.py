"""Errors a user can act on. The CLI prints their message as one line and exits non-zero."""


class StageError(RuntimeError):
    """A stage failed for a reason the user can fix; the message is one actionable line."""


class BadInputError(StageError):
    """Input data, a checkpoint or a path is missing, unreadable or inconsistent."""
