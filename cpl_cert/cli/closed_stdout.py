"""A closed stdout (``cpl-cert ... | head -1``) is not an error: the command finishes its work, exit code unchanged.

Standard library only, installed by ``main`` before anything is printed. Once a write to stdout finds the
reader gone (``BrokenPipeError``), stdout is pointed at ``os.devnull`` and everything further written to
it is dropped, so the files a command writes (``--json``, ``--save-radii``...) are still written, nothing
appears on stderr, and the interpreter's final flush cannot fail.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO


class ClosedPipeSafe:
    """A text stream around ``stream`` whose writes and flushes swallow a closed pipe (then go nowhere)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.closed_pipe = False

    def _silence(self) -> None:
        """Drop what is buffered and write nothing more: the fd now points at the null device."""
        self.closed_pipe = True
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)
        except (OSError, ValueError):  # no file descriptor (an in-memory stream): dropping writes is enough
            pass

    def write(self, text: str) -> int:
        if self.closed_pipe:
            return len(text)
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._silence()
            return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self.closed_pipe:
            return
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._silence()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def install() -> None:
    """Make ``sys.stdout`` safe against a closed pipe (once)."""
    if not isinstance(sys.stdout, ClosedPipeSafe) and sys.stdout is not None:
        sys.stdout = ClosedPipeSafe(sys.stdout)  # type: ignore[assignment]
