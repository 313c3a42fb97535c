"""The runtime's one error type: every message is one line naming the file or value and the fix."""

from __future__ import annotations


class DeployError(ValueError):
    """Bad input for the runtime or ``python -m deploy``: printed as ``error: ...`` without a traceback."""
