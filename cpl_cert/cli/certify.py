"""``cpl-cert certify``: clean and certified accuracy of a checkpoint on a dataset, with reports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from ..certify import CertifyResult, EpsValue, certify, parse_eps
from ..data import ImageDataset, to_float_images
from ..errors import CplCertError
from ..io import file_sha256, write_json
from ..lipschitz import lipschitz_bounds, lipschitz_lower_bound
from ..models import CPLNet
from ..shards import Shards
from .certify_report import certify_report, certify_table, write_radii_csv
from .common import (
    DataDir,
    DeviceName,
    JsonPath,
    ModelPath,
    Threads,
    check_writable,
    console,
    err_console,
    handle_errors,
    job,
    library_default,
    load_model_and_data,
    read_eps,
    set_threads,
    warn_if_not_one_lipschitz,
)
from .plots import plot_certified_accuracy, require_matplotlib
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
            help="Write per-sample predictions, margin and radii in each sense to this CSV (every correct point evaluated in float64).",
        ),
    ] = None,
    plot_path: Annotated[
        Path | None, typer.Option("--plot", metavar="FILE", help="Write a PNG of certified accuracy against radius (needs matplotlib).")
    ] = None,
    lower_samples: Annotated[
        int, typer.Option("--lower-bound-samples", metavar="N", help="Test images for the empirical Lipschitz lower bound (0 skips it).")
    ] = 8,
    threads: Threads = None,
) -> None:
    """Clean accuracy, certified accuracy at each eps, the network's Lipschitz bound and throughput.

    A point is certified at eps when it is correctly classified and its radius exceeds eps. Radii:
    margin / (sqrt(2) L) with a truncation head, min_j (f_top - f_j) / (L_body ||w_top - w_j||) with
    an LLN head; radii near an eps are recomputed in float64 before they count (docs/certify.md).
    """
    # --batch-size is checked by the library (certify).
    with job(device) as shards:
        set_threads(threads)
        if lower_samples < 0:
            raise CplCertError(f"--lower-bound-samples must be 0 or more, got {lower_samples}")
        eps_values = read_eps(eps) if eps is not None else None
        if shards.is_main:  # only rank 0 writes
            for path in (json_path, radii_path, plot_path):
                check_writable(path)
            if plot_path is not None:
                require_matplotlib()
        with Activity(err_console) as activity:
            activity.stage(f"loading {model_path.name} and the {split} split")
            model, _, data = load_model_and_data(model_path, dataset, data_dir, split, limit, shards.device)
            eps_values = eps_values or parse_eps(",".join(data.default_eps))
            result = _certify(activity, shards, model, data, eps_values, batch_size, lower_samples, tight_radii=radii_path is not None)
            if not shards.is_main:
                return
            report = certify_report(result, model=str(model_path), sha256=file_sha256(model_path), dataset=data.name, split=split)
            if plot_path is not None:
                activity.stage(f"drawing {plot_path}")
                plot_certified_accuracy(plot_path, result, f"{model_path.name} on {data.name} ({split} split, {result.n:,} points)")
        _show(result, report, model_path, data, split, batch_size)
        for path, write in ((json_path, lambda p: write_json(p, report)), (radii_path, lambda p: write_radii_csv(p, result))):
            if path is not None:
                write(path)
                console.print(f"wrote {path}", highlight=False)
        if plot_path is not None:
            console.print(f"wrote {plot_path}", highlight=False)


def _certify(
    activity: Activity, shards: Shards, model: CPLNet, data: ImageDataset, eps: list[EpsValue], batch_size: int, lower_samples: int,
    tight_radii: bool,
) -> CertifyResult:
    """Bounds, certification (split over the processes of a torchrun job) and the empirical lower bound
    (rank 0 only: it reports), each shown on the progress line."""
    device = shards.device
    activity.stage("computing the certified Lipschitz bound (per-layer spectral norms)")
    bounds = lipschitz_bounds(model)
    result = certify(
        model, data, eps=eps, device=device, batch_size=batch_size, bounds=bounds, on_progress=activity.reporter(CERTIFY_STAGES),
        tight_radii=tight_radii, shards=shards,
    )
    if lower_samples and shards.is_main:
        activity.stage(f"empirical Lipschitz lower bound on {lower_samples} images (20 power iterations each)")
        probe = to_float_images(data.images[:lower_samples].to(device))
        bounds.lower = lipschitz_lower_bound(model, probe, iters=20, generator=torch.Generator().manual_seed(0))
    return result


def _show(result: CertifyResult, report: dict[str, Any], model_path: Path, data: ImageDataset, split: str, batch_size: int) -> None:
    """The summary table, a warning for a network that is not 1-Lipschitz, and where the data came from."""
    report["batch_size"] = batch_size
    console.print(certify_table(result, title=f"{model_path.name} on {data.name} ({split} split)"))
    warn_if_not_one_lipschitz(model_path.name, result.bounds.body_upper)
    console.print(f"data: {data.source}; certified in {result.seconds:.2f} s", highlight=False)
