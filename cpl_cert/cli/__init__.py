"""The ``cpl-cert`` command line: the Typer app, one module per command, tables, plots and JSON reports."""

from .app import app, main

__all__ = ["app", "main"]
