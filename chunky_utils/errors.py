"""The one exception type that means "the user asked for something that cannot work"."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input; the CLI prints its message on one line and exits with status 2."""
