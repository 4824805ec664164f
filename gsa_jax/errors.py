"""Errors that end a run with a one-line message: the CLI prints them as `gsa-jax: error: ...`
(like ValueError and OSError) instead of a traceback. Imports nothing."""


class RunError(RuntimeError):
    """A run cannot start or cannot go on; the message says why and what to do."""
