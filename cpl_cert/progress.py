"""Progress of long computations, reported through callbacks (the library never prints; ``cli/`` renders).

``on_progress(stage, done, total)`` says that ``done`` of ``total`` units of the stage named ``stage``
are finished; a new stage name starts a new count. ``total`` may be 0 for a stage of unknown length.
"""

from __future__ import annotations

from collections.abc import Callable

OnProgress = Callable[[str, float, float], None]


def no_progress(stage: str, done: float, total: float) -> None:
    """The default ``on_progress``: report nothing."""
