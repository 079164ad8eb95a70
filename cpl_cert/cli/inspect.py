"""``cpl-cert lipschitz`` and ``cpl-cert info``: what a checkpoint holds and how Lipschitz it is."""

from __future__ import annotations

import json
import time
from typing import Annotated

import torch
import typer
from rich.table import Table

from ..checkpoint import load_checkpoint, read_metadata
from ..device import resolve_device
from ..errors import CplCertError
from ..io import file_sha256, write_json
from ..lipschitz import lipschitz_bounds, lipschitz_lower_bound
from ..models import count_parameters
from .common import DeviceName, JsonPath, ModelPath, check_writable, console, handle_errors
from .report import lipschitz_table


@handle_errors
def lipschitz_command(
    model_path: ModelPath,
    json_path: JsonPath = None,
    samples: Annotated[int, typer.Option("--samples", help="Random inputs for the empirical lower bound (0 skips it).")] = 16,
    iters: Annotated[int, typer.Option("--iters", help="Power iterations of J^T J per input for the lower bound.")] = 20,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random inputs.")] = 0,
    device: DeviceName = "auto",
) -> None:
    """Per-layer exact Lipschitz bounds and the network's certified upper and empirical lower bounds.

    For each CPL layer: the frozen step h, the converged power-iteration sigma, a certified upper
    bound of sigma (exact SVD for dense layers, FFT bound for convolutions) and the layer bound
    max(1, h * sigma_up^2 - 1). The network bound is their product; the lower bound is the largest
    ||J(x)||_2 found on random inputs in the valid pixel box [0, 1].
    """
    if samples < 0 or iters < 1:
        raise CplCertError("--samples must be >= 0 and --iters >= 1")
    check_writable(json_path)
    dev = resolve_device(device)
    model, meta = load_checkpoint(model_path, device=dev)
    start = time.perf_counter()
    bounds = lipschitz_bounds(model)
    upper_seconds = time.perf_counter() - start
    if samples:
        generator = torch.Generator().manual_seed(seed)
        inputs = torch.rand((samples, *model.config.input_shape), generator=generator).to(dev)
        bounds.lower = lipschitz_lower_bound(model, inputs, iters=iters, generator=generator)
    console.print(lipschitz_table(bounds, title=f"Lipschitz bounds of {model_path.name}"))
    console.print(f"network upper bound (certified): [bold]{bounds.upper:.8g}[/]  (body {bounds.body_upper:.8g}, computed in {upper_seconds:.2f} s)")
    if bounds.lower is not None:
        console.print(f"network lower bound (max ||J(x)||_2 over {samples} inputs): [bold]{bounds.lower:.6g}[/]")
    if json_path is not None:
        write_json(json_path, {"model": str(model_path), "sha256": file_sha256(model_path), **bounds.to_dict(), "seconds": upper_seconds})
        console.print(f"wrote {json_path}")


@handle_errors
def info_command(
    model_path: ModelPath,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metadata as JSON instead of a table.")] = False,
) -> None:
    """The checkpoint's metadata: format, architecture, dataset and training record."""
    meta = read_metadata(model_path)
    model, _ = load_checkpoint(model_path)
    meta = {**meta, "parameters": count_parameters(model), "sha256": file_sha256(model_path)}
    if as_json:
        typer.echo(json.dumps(meta, indent=2))
        return
    table = Table(title=str(model_path), show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in meta.items():
        if isinstance(value, dict):
            text = "\n".join(f"{k}: {json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in value.items()) or "-"
        else:
            text = str(value)
        table.add_row(key, text)
    console.print(table)
