"""Interrupts (Ctrl-C, SIGTERM) end a command with one sentence and the shell's exit code for the signal.

Standard library only: ``main`` installs this before torch is imported, so an interrupt at any
moment, start-up included, reads the same.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType


class Terminated(KeyboardInterrupt):
    """SIGTERM (what job schedulers send), raised where the program is, like Ctrl-C's KeyboardInterrupt."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def install() -> None:
    """Make SIGTERM raise ``Terminated`` (SIGINT already raises KeyboardInterrupt)."""
    signal.signal(signal.SIGTERM, _raise_terminated)


def exit_code(exc: BaseException) -> int:
    """128 + the signal number: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


def describe(exc: BaseException) -> str:
    """``interrupted`` or ``interrupted (SIGTERM)``."""
    return "interrupted (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"


def ignore_further() -> None:
    """Ignore more interrupts while the program reports the first one and exits (no second traceback)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def exit_interrupted(exc: BaseException, message: str | None = None) -> None:
    """Print ``Error: <message>`` on stderr (plain text: Rich may not be loaded yet) and exit with the signal's code."""
    ignore_further()
    sys.stderr.write(f"Error: {message or describe(exc)}\n")
    sys.stderr.flush()
    raise SystemExit(exit_code(exc))
