"""What every command shares: the consoles, error handling (one sentence, exit 1) and common options."""

from __future__ import annotations

import functools
import inspect
import os
import shlex
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import torch
import typer
from rich.console import Console
from rich.markup import escape

from ..errors import CplCertError
from ..files import portable_dataset, portable_path
from ..shards import Shards, join
from . import interrupt

LOG_WIDTH = 200
"""Columns of the output when it is not a terminal (a log, a pipe) and ``$COLUMNS`` does not say: lines are not cut at 80."""


def other_rank() -> bool:
    """Whether this is a process of a torchrun job other than rank 0."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0
    except ValueError:
        return False


def make_console(stderr: bool = False) -> Console:
    """Rich's console on stdout or stderr; as wide as ``LOG_WIDTH`` when it is not a terminal."""
    console = Console(stderr=stderr)
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console = Console(stderr=stderr, width=LOG_WIDTH)
    return console


console = make_console()
err_console = make_console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

EXIT_ERROR = 1
EXIT_VIOLATION = 3


def fail(message: str, code: int = EXIT_ERROR) -> None:
    """Print ``Error: message`` on stderr and exit with ``code``."""
    err_console.print(f"[bold red]Error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(func: F) -> F:
    """Turn ``CplCertError`` (and any unexpected exception) into one sentence and exit code 1.

    Set ``CPL_CERT_DEBUG=1`` to see the full traceback of unexpected errors.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except CplCertError as exc:
            fail(str(exc))
        except KeyboardInterrupt as exc:
            interrupt.ignore_further()
            fail(interrupt.describe(exc), code=interrupt.exit_code(exc))
        except Exception as exc:  # noqa: BLE001 - the promise is: never a raw traceback
            if os.environ.get("CPL_CERT_DEBUG"):
                raise
            first_line = (str(exc).strip().splitlines() or [""])[0]
            fail(f"{type(exc).__name__}: {first_line} (set CPL_CERT_DEBUG=1 for the traceback)")

    return wrapper  # type: ignore[return-value]


def warn_if_not_one_lipschitz(name: str, body_upper: float) -> None:
    """Say plainly on stderr when a checkpoint's body (every layer before the head) is not the 1-Lipschitz
    map its format promises. The head is not part of the promise: an LLN head's whole-map norm exceeds 1
    by design and enters the certificates through its per-pair constants."""
    if body_upper > 1.0:
        err_console.print(
            f"[bold yellow]Warning:[/] {name} is not 1-Lipschitz (certified bound of the layers before the head "
            f"{body_upper:.6g}): it is not the network the checkpoint format promises; certified radii use that bound.",
            highlight=False,
        )


def check_writable(path: Path | None) -> None:
    """Fail early (before any work) if ``path`` cannot be written."""
    if path is None:
        return
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise CplCertError(f"cannot write {path}: it is a folder")
    if not parent.is_dir():
        raise CplCertError(f"cannot write {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CplCertError(f"cannot write {path}: the folder {parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise CplCertError(f"cannot write {path}: the file is read-only")


def note_limit(option: str, limit: int | None, available: int, what: str) -> None:
    """One line on stderr (not an error: the command goes on with every point) for a limit above the data's size."""
    if limit is not None and limit > available:
        err_console.print(
            f"Note: {option} {limit:,} is more than the {available:,} points of the {what}; using all {available:,}", highlight=False
        )


def count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1: ``1 epoch``, ``10,000 points``."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


@contextmanager
def job(device: str | torch.device) -> Iterator[Shards]:
    """The command's share of the evaluation: ``cpl_cert.shards.join`` (under torchrun; all of it for one process).

    Processes other than rank 0 print nothing from here on, errors included: rank 0 speaks for the job.
    An error inside is passed on to every process before the command reports it; from then on
    interrupts are ignored, so that rank 0 says the one sentence even when torchrun, seeing a process
    end, stops the others with SIGTERM.
    """
    if other_rank():
        console.quiet = err_console.quiet = True
    with join(device) as shards:
        try:
            yield shards
        except Exception:
            if shards.enabled:
                interrupt.ignore_further()
            raise


def library_default(func: Callable[..., Any], name: str) -> Any:
    """The default of ``func``'s parameter ``name``: a command's defaults are the library's."""
    return inspect.signature(func).parameters[name].default


def command_line(ctx: typer.Context) -> str:
    """The running command as the user gave it: ``cpl-cert <command>`` and the options set on the
    command line (the same whether started as ``cpl-cert``, ``python -m cpl_cert`` or under torchrun),
    with paths made portable (``cpl_cert.files.portable_path``: relative to the working folder, or the name)."""
    parts = ["cpl-cert", ctx.info_name or ""]
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name) if param.name else None
        if source is None or source.name != "COMMANDLINE":
            continue
        value = ctx.params[param.name]
        if isinstance(value, Path):
            value = portable_path(value)
        elif isinstance(value, str) and value.startswith("folder:"):
            value = portable_dataset(value)
        if param.param_type_name != "option":
            parts.append(str(value))
        elif getattr(param, "is_flag", False):
            parts.append(param.opts[0] if value else (param.secondary_opts or param.opts)[0])
        else:
            parts += [param.opts[0], str(value)]
    return shlex.join(parts)


def set_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads for torch (``None``: torch's default)."""
    if threads is None:
        return
    if threads < 1:
        raise CplCertError(f"--threads must be a positive number, got {threads}")
    torch.set_num_threads(threads)


ModelPath = Annotated[Path, typer.Argument(help="A cpl-cert checkpoint (.safetensors).", metavar="MODEL", show_default=False)]
DeviceName = Annotated[str, typer.Option("--device", metavar="DEVICE", help="auto (CUDA when available), cpu, cuda or cuda:N.")]
DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", metavar="DIR", help="Folder holding the dataset files; it must hold them (no other copy is used)."),
]
JsonPath = Annotated[Path | None, typer.Option("--json", metavar="FILE", help="Also write the report as JSON to this file.")]
Threads = Annotated[
    int | None,
    typer.Option(
        "--threads", metavar="N", show_default=False,
        help="CPU threads for torch (default: torch's, one per core). On a machine shared with other jobs, 1 is often fastest.",
    ),
]
