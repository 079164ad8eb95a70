"""``cpl-cert predict``: the predicted class and its certified radius for new images."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ..checkpoint import load_checkpoint
from ..device import resolve_device
from ..eps import parse_single_eps
from ..files import atomic_write
from ..inputs import Inputs, load_inputs
from ..prediction import PredictResult, predict
from .common import (
    DeviceName,
    ModelPath,
    Threads,
    check_writable,
    console,
    count,
    err_console,
    handle_errors,
    set_threads,
)
from .progress import Activity
from .table import Table


def class_names(meta: dict[str, Any], num_classes: int) -> list[str]:
    """The checkpoint's class names, or the class indices as text when it has none (or the wrong number)."""
    names = (meta.get("dataset") or {}).get("classes")
    if isinstance(names, list) and len(names) == num_classes:
        return [str(name) for name in names]
    return [str(i) for i in range(num_classes)]


def records(inputs: Inputs, result: PredictResult, names: list[str]) -> list[dict[str, Any]]:
    """One JSON-ready dict per input."""
    rows = []
    for i, name in enumerate(inputs.names):
        k = int(result.predictions[i])
        row: dict[str, Any] = {"input": name, "class": k, "name": names[k], "radius": float(result.radii[i])}
        if result.eps is not None and result.certified is not None:
            row.update(eps=result.eps.value, certified=bool(result.certified[i]))
        rows.append(row)
    return rows


def predictions_table(rows: list[dict[str, Any]], eps_label: str | None, title: str) -> Table:
    table = Table(title=title)
    for column in ("input", "class", "name", "certified radius") + ((f"certified at {eps_label}",) if eps_label else ()):
        table.add_column(column, justify="right" if column in ("class", "certified radius") else "left", overflow="fold")
    for row in rows:
        cells = [row["input"], str(row["class"]), row["name"], f"{row['radius']:.6g}"]
        if eps_label:
            cells.append("[green]yes[/]" if row["certified"] else "[red]no[/]")
        table.add_row(*cells)
    return table


def write_json_lines(target: Path, rows: list[dict[str, Any]]) -> None:
    """JSON lines to ``target`` (atomically), or to stdout for ``-``."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if str(target) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        atomic_write(target, lambda tmp: Path(tmp).write_text(text))


@handle_errors
def predict_command(
    model_path: ModelPath,
    inputs: Annotated[
        list[Path],
        typer.Argument(help="PNG/JPEG files, folders of them, or .npy arrays ((H,W), (C,H,W) or (N,C,H,W)).", metavar="INPUT", show_default=False),
    ],
    eps: Annotated[
        str | None,
        typer.Option("--eps", metavar="RADIUS", help="Also say whether each prediction is certified at this l2 radius (e.g. 0.25 or 36/255)."),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", metavar="FILE", help="Write one JSON line per input to this file ('-' for stdout, without the table).")
    ] = None,
    resize: Annotated[
        bool, typer.Option("--resize", help="Resize inputs of another size to the model's (antialiased); otherwise they are refused.")
    ] = False,
    convert: Annotated[
        bool,
        typer.Option(
            "--convert",
            help="Allow lossless conversions only: drop an alpha channel that is opaque everywhere, copy grey into R, G and B, "
            "make RGB with equal channels grey; otherwise such images are refused.",
        ),
    ] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", metavar="N", help="Images per forward pass.")] = 1024,
    device: DeviceName = "auto",
    threads: Threads = None,
) -> None:
    """Predicted class (index and name) and certified l2 radius for each input image.

    Pixels are read at their true values (value / (2^depth - 1): 8-bit / 255, 16-bit PNG / 65535); the
    radius is an l2 distance in that [0, 1] scale within which the prediction provably cannot change.
    Inputs must match the model's channels and size and have no alpha channel (--convert and --resize
    convert explicitly).
    """
    set_threads(threads)
    eps_value = parse_single_eps(eps) if eps is not None else None  # before any work; --batch-size: predict's check
    to_stdout = json_path is not None and str(json_path) == "-"
    if json_path is not None and not to_stdout:
        check_writable(json_path)
    dev = resolve_device(device)
    with Activity(err_console) as activity:
        activity.stage(f"loading {model_path.name}")
        model, meta = load_checkpoint(model_path, device=dev)
        activity.stage("reading the inputs")
        data = load_inputs(
            inputs, model.config.input_shape, resize=resize, on_progress=lambda stage, done, total: activity.update(done, total),
            convert=convert, how="--convert",
        )
        activity.stage("certifying", len(data))
        result = predict(
            model, data.images, eps=eps_value, device=dev, batch_size=batch_size,
            on_progress=lambda stage, done, total: activity.update(done) if stage == "float32" else None,
        )
    rows = records(data, result, class_names(meta, model.config.num_classes))
    if json_path is not None:
        write_json_lines(json_path, rows)
    if to_stdout:
        return
    eps_label = result.eps.label if result.eps is not None else None
    console.print(predictions_table(rows, eps_label, f"{model_path.name}: {count(result.n, 'input')}, Lipschitz bound {result.bounds.upper:.6g}"))
    if result.certified is not None:
        console.print(f"certified at {eps_label}: {int(result.certified.sum())} of {result.n}", highlight=False)
    if json_path is not None:
        console.print(f"wrote {json_path}", highlight=False)
