"""Interrupts (Ctrl-C, SIGTERM) end a command with one sentence and the shell's exit code for the signal.

Standard library only: ``main`` installs this before torch is imported, so an interrupt at any
moment, start-up included, reads the same.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType


class Terminated(KeyboardInterrupt):
    """SIGTERM (what job schedulers send), raised where the program is, like Ctrl-C's KeyboardInterrupt."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def _exit_during_start_up(signum: int, frame: FrameType | None) -> None:
    """Answer at once and leave without unwinding: nothing exists yet that could be lost."""
    _say(_sentence(signum))
    os._exit(128 + signum)


def install_for_start_up() -> None:
    """While modules load, an interrupt exits directly.

    An exception raised inside an extension module's import (numpy, torch) can be swallowed by the
    import machinery or leave the module half-loaded ("cannot load module more than once"), so the
    program would carry on or print a traceback; exiting from the handler avoids both.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _exit_during_start_up)


def install() -> None:
    """Once loaded: SIGINT raises KeyboardInterrupt, SIGTERM raises ``Terminated``, so commands can clean up."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_terminated)


def _signum(exc: BaseException) -> int:
    return signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT


def _sentence(signum: int) -> str:
    return "interrupted (SIGTERM)" if signum == signal.SIGTERM else "interrupted"


def _say(message: str) -> None:
    """``Error: <message>`` on stderr, plain text: Rich may not be loaded yet."""
    sys.stderr.write(f"Error: {message}\n")
    sys.stderr.flush()


def exit_code(exc: BaseException) -> int:
    """128 + the signal number: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + _signum(exc)


def describe(exc: BaseException) -> str:
    """``interrupted`` or ``interrupted (SIGTERM)``."""
    return _sentence(_signum(exc))


def ignore_further() -> None:
    """Ignore more interrupts while the program reports the first one and exits (no second traceback)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def exit_interrupted(exc: BaseException, message: str | None = None) -> None:
    """Print ``Error: <message>`` on stderr and exit with the signal's code."""
    ignore_further()
    _say(message or describe(exc))
    raise SystemExit(exit_code(exc))
