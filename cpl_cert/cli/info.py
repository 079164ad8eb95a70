"""``cpl-cert lipschitz`` and ``cpl-cert info``: what a checkpoint holds and how Lipschitz it is."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from ..checkpoint import load_checkpoint, read_metadata
from ..device import resolve_device
from ..errors import CplCertError
from ..files import file_sha256, write_json
from ..lipschitz import lipschitz_bounds, lipschitz_lower_bound
from ..models import count_parameters
from .common import (
    DeviceName,
    JsonPath,
    ModelPath,
    Threads,
    check_writable,
    console,
    count,
    err_console,
    handle_errors,
    set_threads,
    warn_if_not_one_lipschitz,
)
from .progress import Activity
from .report import lipschitz_table
from .table import Table


@handle_errors
def lipschitz_command(
    model_path: ModelPath,
    json_path: JsonPath = None,
    samples: Annotated[int, typer.Option("--samples", metavar="N", help="Random inputs for the empirical lower bound (0 skips it).")] = 16,
    iters: Annotated[int, typer.Option("--iters", metavar="N", help="Power iterations of J^T J per input for the lower bound.")] = 20,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random inputs.")] = 0,
    device: DeviceName = "auto",
    threads: Threads = None,
) -> None:
    """Per-layer certified Lipschitz bounds and the network's certified upper and empirical lower bounds.

    For each CPL layer: the frozen step h, the power-iteration sigma, a certified upper bound of sigma
    (for dense layers the Gram matrix's top eigenvalue, proved by a Cholesky factorisation, or for small
    ones by an eigensolver with its backward error; the FFT bound for convolutions) and the
    layer bound max(1, h * sigma_up^2 - 1); for an SLL layer the certified bound of ||diag(sqrt t) W||.
    The network bound is their product; the lower bound is the largest ||J(x)||_2 found on random inputs
    in the valid pixel box [0, 1].
    """
    set_threads(threads)
    if samples < 0 or iters < 1:
        raise CplCertError("--samples must be >= 0 and --iters >= 1")
    check_writable(json_path)
    dev = resolve_device(device)
    with Activity(err_console) as activity:
        activity.stage(f"loading {model_path.name}")
        model, meta = load_checkpoint(model_path, device=dev)
        activity.stage("computing the certified Lipschitz bound (per-layer spectral norms)")
        start = time.perf_counter()
        bounds = lipschitz_bounds(model)
        upper_seconds = time.perf_counter() - start
        if samples:
            label = f"empirical lower bound: largest ||J(x)||_2 on {count(samples, 'random input')} ({count(iters, 'power iteration')} each)"
            activity.stage(label, iters)
            generator = torch.Generator().manual_seed(seed)
            inputs = torch.rand((samples, *model.config.input_shape), generator=generator).to(dev)
            progress = activity.reporter({"lower_bound": label})
            bounds.lower = lipschitz_lower_bound(model, inputs, iters=iters, generator=generator, on_progress=progress)
    console.print(lipschitz_table(bounds, title=f"Lipschitz bounds of {model_path.name}"))
    warn_if_not_one_lipschitz(model_path.name, bounds.body_upper)
    console.print(f"network upper bound (certified): [bold]{bounds.upper:.8g}[/]  (body {bounds.body_upper:.8g}, computed in {upper_seconds:.2f} s)")
    if bounds.lower is not None:
        console.print(f"network lower bound (max ||J(x)||_2 over {count(samples, 'input')}): [bold]{bounds.lower:.6g}[/]")
    if json_path is not None:
        write_json(json_path, {"model": str(model_path), "sha256": file_sha256(model_path), **bounds.to_dict(), "seconds": upper_seconds})
        console.print(f"wrote {json_path}", highlight=False)


EVAL_KEYS = ("clean_accuracy", "certified")
"""Entries of a checkpoint's training record measured by the per-epoch evaluation, which may use a subset."""


def training_rows(training: dict[str, Any]) -> list[str]:
    """The training record as ``key: value`` lines, the per-epoch evaluation figures labelled with what they are."""
    n = training.get("eval_n")
    epoch = training.get("epochs_completed", training.get("epochs"))
    where = f"epoch {epoch} evaluation, first {n:,} test images" if isinstance(n, int) else "per-epoch evaluation"
    lines = []
    for key, value in training.items():
        if key in EVAL_KEYS:
            shown = f"{value:.2%}" if isinstance(value, (int, float)) else ", ".join(f"{k}: {v:.2%}" for k, v in value.items())
            lines.append(f"{key} ({where}): {shown}")
        else:
            lines.append(f"{key}: {json.dumps(value) if isinstance(value, (list, dict)) else value}")
    return lines


@handle_errors
def info_command(
    model_path: ModelPath,
    json_path: Annotated[
        Path | None, typer.Option("--json", metavar="FILE", help="Write the metadata as JSON to this file ('-' for stdout, without the table).")
    ] = None,
    threads: Threads = None,
) -> None:
    """The checkpoint's metadata: format, architecture, dataset and training record."""
    set_threads(threads)
    to_stdout = json_path is not None and str(json_path) == "-"
    if json_path is not None and not to_stdout:
        check_writable(json_path)
    meta = read_metadata(model_path)
    model, _ = load_checkpoint(model_path)
    bounds = lipschitz_bounds(model)
    meta = {**meta, "parameters": count_parameters(model), "lipschitz_upper": bounds.upper, "sha256": file_sha256(model_path)}
    if to_stdout:
        typer.echo(json.dumps(meta, indent=2))
        return
    table = Table(title=str(model_path), show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in meta.items():
        if key == "training" and isinstance(value, dict):
            text = "\n".join(training_rows(value)) or "-"
        elif isinstance(value, dict):
            text = "\n".join(f"{k}: {json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in value.items()) or "-"
        else:
            text = str(value)
        table.add_row(key, text)
    console.print(table)
    warn_if_not_one_lipschitz(model_path.name, bounds.body_upper)
    if json_path is not None:
        write_json(json_path, meta)
        console.print(f"wrote {json_path}", highlight=False)
