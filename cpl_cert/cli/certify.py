"""``cpl-cert certify``: clean and certified accuracy of a checkpoint on a dataset, with reports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..certification import CertifyResult, certify
from ..data import ImageDataset
from ..eps import EpsValue, parse_eps
from ..errors import CplCertError
from ..files import file_sha256, write_json
from ..lipschitz import LOWER_ITERS, data_lower_bound, lipschitz_bounds
from ..loading import load_model_and_data
from ..models import CPLNet
from ..shards import Shards
from . import interrupt
from .certify_report import CSV_HEADER, LowerBound, certify_table, json_report, write_radii_csv
from .common import (
    DataDir,
    DeviceName,
    JsonPath,
    ModelPath,
    Threads,
    check_writable,
    console,
    count,
    err_console,
    fail,
    handle_errors,
    job,
    library_default,
    note_limit,
    set_threads,
    warn_if_not_one_lipschitz,
)
from .plots import check_plot_path, plot_certified_accuracy
from .progress import Activity

CERTIFY_STAGES = {
    "float32": "certifying (float32 convolutions, float64 dense layers)",
    "float64": "re-evaluating points near a radius (float64)",
}
"""What each stage of ``cpl_cert.certify`` is called on the progress line."""


@handle_errors
def certify_command(
    model_path: ModelPath,
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset", metavar="NAME",
            help="fashion-mnist, mnist, cifar10, cifar100 or folder:PATH (default: the checkpoint's dataset).",
        ),
    ] = None,
    data_dir: DataDir = None,
    eps: Annotated[
        str | None,
        typer.Option(
            "--eps", metavar="RADII",
            help="Radii, comma-separated, e.g. 0.1,0.25,36/255 (default: 36/255,72/255,108/255 for CIFAR, 0.1,0.25,0.5,1.0 for 28x28 data).",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", metavar="N", help="Images per forward pass.")] = library_default(certify, "batch_size"),
    device: DeviceName = "auto",
    limit: Annotated[int | None, typer.Option("--limit", metavar="N", help="Certify only the first N points (default: all).")] = None,
    split: Annotated[str, typer.Option("--split", help="test or train.")] = "test",
    json_path: JsonPath = None,
    radii_path: Annotated[
        Path | None,
        typer.Option(
            "--save-radii", metavar="FILE",
            help=f"Write one CSV row per point with the columns {', '.join(CSV_HEADER)} "
            "(docs/certify.md; every point is evaluated in float64, so the radii are tight).",
        ),
    ] = None,
    plot_path: Annotated[
        Path | None, typer.Option("--plot", metavar="FILE", help="Write a PNG of certified accuracy against radius (needs matplotlib).")
    ] = None,
    lower_samples: Annotated[
        int, typer.Option("--lower-bound-samples", metavar="N", help="Test images for the empirical Lipschitz lower bound (0 skips it).")
    ] = library_default(data_lower_bound, "samples"),
    threads: Threads = None,
) -> None:
    """Clean accuracy, certified accuracy at each eps, the network's Lipschitz bound and throughput.

    A point is certified at eps when it is correctly classified and its radius exceeds eps. Radii:
    margin / (sqrt(2) L) with a truncation head, min_j (f_top - f_j) / (L_body ||w_top - w_j||) with
    an LLN head; radii near an eps are recomputed in float64 before they count (docs/certify.md).
    The results are printed as soon as they exist; the empirical lower bound comes last, and an
    interrupt there keeps them (the reports are written with the lower bound marked not computed).
    """
    # --batch-size is checked by the library (certify).
    with job(device) as shards:
        set_threads(threads)
        if lower_samples < 0:
            raise CplCertError(f"--lower-bound-samples must be 0 or more, got {lower_samples}")
        eps_values = parse_eps(eps) if eps is not None else None
        if shards.is_main:  # only rank 0 writes
            check_writable(json_path)
            check_writable(radii_path)
            check_plot_path(plot_path)
        with Activity(err_console) as activity:
            activity.stage(f"loading {model_path.name} and the {split} split")
            loaded = load_model_and_data(model_path, dataset, data_dir, split, limit, shards.device)
            model, data = loaded.model, loaded.data
            note_limit("--limit", limit, loaded.available, f"{data.name} {split} split")
            eps_values = eps_values or parse_eps(",".join(data.default_eps))
            result = _certify(activity, shards, model, data, eps_values, batch_size, tight_radii=radii_path is not None)
        if shards.is_main:
            _report(result, model, data, model_path, split, batch_size, lower_samples, (json_path, radii_path, plot_path))


def _report(
    result: CertifyResult, model: CPLNet, data: ImageDataset, model_path: Path, split: str, batch_size: int, lower_samples: int,
    paths: tuple[Path | None, Path | None, Path | None],
) -> None:
    """Rank 0: the table at once, then the empirical lower bound, then the reports; an interrupt during the
    lower bound keeps the certification (the reports say the lower bound was not computed)."""
    _show(result, model_path, data, split)
    lower, stopped = _lower_bound(model, data, result.bounds.upper, lower_samples)
    fields = {"model": str(model_path), "sha256": file_sha256(model_path), "dataset": data.name, "split": split}
    report = json_report(result, fields, lower, batch_size)
    title = f"{model_path.name} on {data.name} ({split} split, {result.n:,} points)"
    written = _write_outputs(report, result, *paths, title)
    if stopped is not None:
        kept = f"; {', '.join(map(str, written))} {'holds' if len(written) == 1 else 'hold'} it (lower bound not computed)" if written else ""
        fail(f"{interrupt.describe(stopped)} during the empirical Lipschitz lower bound; the certification above is complete{kept}",
             code=interrupt.exit_code(stopped))


def _certify(
    activity: Activity, shards: Shards, model: CPLNet, data: ImageDataset, eps: list[EpsValue], batch_size: int, tight_radii: bool,
) -> CertifyResult:
    """Bounds and certification (split over the processes of a torchrun job), each shown on the progress line."""
    device = shards.device
    activity.stage("computing the certified Lipschitz bound (per-layer spectral norms)")
    bounds = lipschitz_bounds(model)
    return certify(
        model, data, eps=eps, device=device, batch_size=batch_size, bounds=bounds, on_progress=activity.reporter(CERTIFY_STAGES),
        tight_radii=tight_radii, shards=shards,
    )


def _lower_bound(model: CPLNet, data: ImageDataset, upper: float, samples: int) -> tuple[LowerBound, BaseException | None]:
    """The empirical lower bound at the first ``samples`` images (``data_lower_bound``), on its own progress line with
    the time left, then printed. Returns it (value and status: computed, skipped, interrupted) and the interrupt."""
    if samples == 0:
        return LowerBound(None, "skipped"), None
    images = count(min(samples, len(data)), "test image")
    label = f"empirical Lipschitz lower bound: largest ||J(x)||_2 at {images} ({LOWER_ITERS} power iterations)"
    try:
        with Activity(err_console) as activity:
            activity.stage(label, LOWER_ITERS)
            value = data_lower_bound(model, data.images, samples, LOWER_ITERS, on_progress=activity.reporter({"lower_bound": label}))
    except KeyboardInterrupt as exc:
        interrupt.ignore_further()
        return LowerBound(None, "interrupted"), exc
    console.print(f"Lipschitz lower bound (largest ||J(x)||_2 found at {images}): {value:.6g}; certified upper bound {upper:.8g}", highlight=False)
    return LowerBound(value, "computed"), None


def _write_outputs(
    report: dict[str, Any], result: CertifyResult, json_path: Path | None, radii_path: Path | None, plot_path: Path | None, title: str
) -> list[Path]:
    """The plot, the JSON report and the per-sample CSV that were asked for, each announced; the paths written."""
    written = []
    if plot_path is not None:
        with Activity(err_console) as activity:
            activity.stage(f"drawing {plot_path}")
            plot_certified_accuracy(plot_path, result, title)
    for path, write in ((json_path, lambda p: write_json(p, report)), (radii_path, lambda p: write_radii_csv(p, result)), (plot_path, None)):
        if path is not None:
            if write is not None:
                write(path)
            written.append(path)
            console.print(f"wrote {path}", highlight=False)
    return written


def _show(result: CertifyResult, model_path: Path, data: ImageDataset, split: str) -> None:
    """The summary table, a warning for a network that is not 1-Lipschitz, and where the data came from."""
    console.print(certify_table(result, title=f"{model_path.name} on {data.name} ({split} split)"))
    warn_if_not_one_lipschitz(model_path.name, result.bounds.body_upper)
    console.print(f"data: {data.source}; certified in {result.seconds:.2f} s", highlight=False)
