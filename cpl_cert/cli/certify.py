"""``cpl-cert certify``: clean and certified accuracy of a checkpoint on a dataset, with reports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..certify import certify, parse_eps
from ..data import to_float_images
from ..device import resolve_device
from ..errors import CplCertError
from ..io import file_sha256, write_json
from ..lipschitz import lipschitz_bounds, lipschitz_lower_bound
from .certify_report import certify_report, certify_table, write_radii_csv
from .common import DeviceName, JsonPath, ModelPath, check_writable, console, err_console, handle_errors, library_default, load_model_and_data
from .plots import plot_certified_accuracy, require_matplotlib


@handle_errors
def certify_command(
    model_path: ModelPath,
    dataset: Annotated[
        str | None,
        typer.Option("--dataset", help="fashion-mnist, mnist, cifar10, cifar100 or folder:PATH (default: the checkpoint's dataset)."),
    ] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Folder holding the dataset files (searched first).")] = None,
    eps: Annotated[
        str | None,
        typer.Option(
            "--eps",
            help="Radii, comma-separated, e.g. 0.1,0.25,36/255 (default: 36/255,72/255,108/255 for CIFAR, 0.1,0.25,0.5,1.0 for 28x28 data).",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = library_default(certify, "batch_size"),
    device: DeviceName = "auto",
    limit: Annotated[int | None, typer.Option("--limit", help="Certify only the first N points.")] = None,
    split: Annotated[str, typer.Option("--split", help="test or train.")] = "test",
    json_path: JsonPath = None,
    radii_path: Annotated[
        Path | None, typer.Option("--save-radii", help="Write per-sample index,label,prediction,margin,radius to this CSV.")
    ] = None,
    plot_path: Annotated[
        Path | None, typer.Option("--plot", help="Write a PNG of certified accuracy against radius (needs matplotlib).")
    ] = None,
    lower_samples: Annotated[
        int, typer.Option("--lower-bound-samples", help="Test images for the empirical Lipschitz lower bound (0 skips it).")
    ] = 8,
) -> None:
    """Clean accuracy, certified accuracy at each eps, the network's Lipschitz bound and throughput.

    A point is certified at eps when it is correctly classified and its radius exceeds eps. Radii:
    margin / (sqrt(2) L) with a truncation head, min_j (f_top - f_j) / (L_body ||w_top - w_j||) with
    an LLN head; radii near an eps are recomputed in float64 before they count (docs/certify.md).
    """
    # --limit and --batch-size are checked by the library (ImageDataset.subset, certify).
    if lower_samples < 0:
        raise CplCertError(f"--lower-bound-samples must be 0 or more, got {lower_samples}")
    eps_values = parse_eps(eps) if eps is not None else None
    for path in (json_path, radii_path, plot_path):
        check_writable(path)
    if plot_path is not None:
        require_matplotlib()
    dev = resolve_device(device)

    model, _, data = load_model_and_data(model_path, dataset, data_dir, split, limit, dev)
    if eps_values is None:
        eps_values = parse_eps(",".join(data.default_eps))

    bounds = lipschitz_bounds(model)
    with Progress(
        TextColumn("certifying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True
    ) as bar:
        task = bar.add_task("certify", total=len(data))
        result = certify(
            model, data, eps=eps_values, device=dev, batch_size=batch_size, bounds=bounds,
            progress=lambda done, total: bar.update(task, completed=done),
        )
    if lower_samples:
        probe = to_float_images(data.images[:lower_samples].to(dev))
        bounds.lower = lipschitz_lower_bound(model, probe, iters=20, generator=torch.Generator().manual_seed(0))

    table = certify_table(result, title=f"{model_path.name} on {data.name} ({split} split)")
    console.print(table)
    if bounds.upper > 1.0:
        err_console.print(
            f"[bold yellow]Warning:[/] {model_path.name} is not 1-Lipschitz (certified bound {bounds.upper:.6g}): "
            "it is not the network the checkpoint format promises; its radii use that bound.",
            highlight=False,
        )
    console.print(f"data: {data.source}; certified in {result.seconds:.2f} s", highlight=False)
    report = certify_report(result, model=str(model_path), sha256=file_sha256(model_path), dataset=data.name, split=split)
    report["batch_size"] = batch_size
    if json_path is not None:
        write_json(json_path, report)
        console.print(f"wrote {json_path}")
    if radii_path is not None:
        write_radii_csv(radii_path, result)
        console.print(f"wrote {radii_path}")
    if plot_path is not None:
        marks = [(e["eps"], e["label"], e["accuracy"]) for e in result.certified]
        plot_certified_accuracy(plot_path, result.correct, result.radii_exact, marks, f"{model_path.name} on {data.name} ({result.n} points)")
        console.print(f"wrote {plot_path}")
