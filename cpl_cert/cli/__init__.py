"""The ``cpl-cert`` command line: the Typer app, one module per command, tables, plots and JSON reports.

Importing this package is cheap (the app loads in ``main``), so that an interrupt while torch is
still loading ends with one sentence like any other.
"""

from __future__ import annotations

from typing import Any

from . import closed_stdout, interrupt

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point: SIGTERM handled like Ctrl-C, both answered with one sentence at any moment;
    a closed stdout (``| head``) is not an error."""
    interrupt.install_for_start_up()
    closed_stdout.install()
    from .commands import app

    interrupt.install()
    try:
        app(prog_name="cpl-cert")
    except KeyboardInterrupt as exc:
        interrupt.exit_interrupted(exc)


def __getattr__(name: str) -> Any:
    """``from cpl_cert.cli import app`` loads the Typer app on first use."""
    if name == "app":
        from .commands import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
