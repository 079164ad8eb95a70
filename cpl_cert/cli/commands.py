"""The Typer app: the root options and every command, registered from its own module."""

from __future__ import annotations

from typing import Annotated

import typer

from ..version import __version__
from .attack import attack_command
from .certify import certify_command
from .export import export_command
from .helptext import Command, Group
from .importer import import_command
from .info import info_command, lipschitz_command
from .predict import predict_command
from .train import train_command

app = typer.Typer(
    name="cpl-cert",
    cls=Group,
    help=(
        "Train 1-Lipschitz Convex Potential Layer networks, certify their l2 robustness with exact "
        "Lipschitz bounds, and check the certificates against attacks.\n\n"
        "Exit codes: 0 success, 1 bad input or runtime error, 2 usage error, 3 an attack contradicted a certificate."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cpl-cert {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """cpl-cert: certified robustness for CPL networks."""


app.command("train", cls=Command)(train_command)
app.command("certify", cls=Command)(certify_command)
app.command("attack", cls=Command)(attack_command)
app.command("lipschitz", cls=Command)(lipschitz_command)
app.command("info", cls=Command)(info_command)
app.command("import", cls=Command)(import_command)
app.command("predict", cls=Command)(predict_command)
app.command("export", cls=Command)(export_command)
