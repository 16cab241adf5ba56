"""Fault injection for the kill/resume tests: crash at a named point, like a power cut would.

Set ``EXPLAINKIT_FAULT=<point>`` (e.g. ``store-write:2``, ``checkpoint-write:3``, ``step:2``)
and the process SIGKILLs itself there. Unset (always, outside tests), it costs one dict lookup.
"""

from __future__ import annotations

import os
import signal


def fault_point(name: str) -> None:
    """SIGKILL this process if EXPLAINKIT_FAULT names this point."""
    if os.environ.get("EXPLAINKIT_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
