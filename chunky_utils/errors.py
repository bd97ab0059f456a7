"""The project's exceptions: bad input (`UsageError`) and a run stopped on request (`StopRequested`)."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input; the CLI prints its message on one line and exits with status 2."""


class StopRequested(Exception):
    """The user asked to stop: raised at the next forward or decoding step, so a run ends within one step."""
