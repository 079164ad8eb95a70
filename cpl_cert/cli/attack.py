"""``cpl-cert attack``: attack a checkpoint's test points and check every certificate against the attacks."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from ..attacks.audit import AttackSummary, attack_dataset, estimate_seconds, summarize
from ..attacks.ensemble import SuiteResult, SuiteWork, run_suite
from ..attacks.options import ATTACKS, ENGINES, check_attack_options, default_attack, measures_distance
from ..certification import CertifyResult, certify
from ..data import ImageDataset
from ..eps import EpsValue, parse_eps
from ..errors import CplCertError
from ..files import file_sha256, write_json
from ..lipschitz import LipschitzBounds, assume_body_bound, check_assumed_bound, lipschitz_bounds
from ..loading import load_model_and_data
from ..models import CPLNet
from ..shards import Shards
from .attack_report import accuracy_table, json_report, tightness_table, violations_table
from .certify import CERTIFY_STAGES
from .common import (
    EXIT_VIOLATION,
    DataDir,
    DeviceName,
    JsonPath,
    ModelPath,
    Threads,
    check_writable,
    console,
    count,
    err_console,
    handle_errors,
    job,
    library_default,
    note_limit,
    set_threads,
)
from .plots import check_plot_path, plot_gap
from .progress import Activity, clock

DEFAULT_LIMIT = 1000
LONG_RUN_SECONDS = 300.0
"""Past this estimate, the command says up front how long the attacks may take."""


@handle_errors
def attack_command(
    model_path: ModelPath,
    attack: Annotated[
        str | None,
        typer.Option(
            "--attack", metavar="NAME",
            help=f"{', '.join(ATTACKS)}. Native engine (default apgd): PGD-L2, APGD-CE + APGD-T, the worst case of all, FMN-L2 "
            "minimum norm. With --engine autoattack (default autoattack): the authors' standard AutoAttack (APGD-CE, APGD-T, "
            "FAB-T, Square), apgd (APGD-CE + APGD-T), fab (FAB-T) or square.",
        ),
    ] = None,
    eps: Annotated[
        str | None, typer.Option("--eps", metavar="RADII", help="Radii, e.g. '0.1,0.25' or '36/255' (default: the dataset's list).")
    ] = None,
    limit: Annotated[
        int,
        typer.Option(
            "--limit", metavar="N",
            help="Attack the first N test points. The default is 1000, not all (as certify), because an attack costs "
            "hundreds of forward and backward passes per point.",
        ),
    ] = DEFAULT_LIMIT,
    engine: Annotated[
        str,
        typer.Option(
            "--engine", help=f"{' or '.join(ENGINES)}: cpl-cert's attacks, or Croce & Hein's own code (optional extra autoattack: pyautoattack)."
        ),
    ] = library_default(run_suite, "engine"),
    dataset: Annotated[str | None, typer.Option("--dataset", metavar="NAME", help="Dataset name (default: the checkpoint's).")] = None,
    data_dir: DataDir = None,
    device: DeviceName = "auto",
    batch_size: Annotated[
        int, typer.Option("--batch-size", metavar="N", help="Points attacked at once.")
    ] = library_default(run_suite, "batch_size"),
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random starts.")] = library_default(run_suite, "seed"),
    steps: Annotated[
        int, typer.Option("--steps", metavar="N", help="Iterations of PGD and APGD per run (reference 100; FMN runs twice as many).")
    ] = library_default(run_suite, "steps"),
    json_path: JsonPath = None,
    plot_path: Annotated[
        Path | None,
        typer.Option("--plot", metavar="FILE", help="PNG: certified radius and smallest adversarial distance per point (minnorm, autoattack)."),
    ] = None,
    assume_lipschitz: Annotated[
        float | None,
        typer.Option(
            "--assume-lipschitz", metavar="L",
            help="AUDIT ONLY: check certificates computed as if the network body were L-Lipschitz (the paper's code assumes 1) "
            "instead of cpl-cert's certified bound; such certificates are not guarantees.",
        ),
    ] = None,
    threads: Threads = None,
) -> None:
    """Attack test points and check every certificate: robust accuracy beside certified accuracy.

    Each point is attacked with respect to its clean prediction; an adversarial example (re-verified in
    float64) closer than the point's certified radius is a certificate violation: all are listed and
    the command exits with code 3.
    """
    with job(device) as shards:
        set_threads(threads)
        attack = attack or default_attack(engine)
        check_attack_options(attack, engine, steps, batch_size)
        check_assumed_bound(assume_lipschitz)
        eps_values = parse_eps(eps) if eps is not None else None
        if shards.is_main:  # only rank 0 writes
            _check_outputs(json_path, plot_path, attack, engine)
        with Activity(err_console) as activity:
            activity.stage(f"loading {model_path.name} and the test split")
            loaded = load_model_and_data(model_path, dataset, data_dir, "test", limit, shards.device)
            model, data = loaded.model, loaded.data
            note_limit("--limit", limit, loaded.available, f"{data.name} test split")
            eps_values = eps_values or parse_eps(",".join(data.default_eps))
            start = time.perf_counter()
            activity.stage("computing the certified Lipschitz bound (per-layer spectral norms)")
            bounds = _bounds(model, assume_lipschitz)
            cert = certify(
                model, data, eps=[e.label for e in eps_values], device=shards.device, batch_size=batch_size, bounds=bounds,
                on_progress=activity.reporter(CERTIFY_STAGES), shards=shards,
            )
            _note_duration(model, data, attack, engine, steps, len(eps_values), batch_size, shards)
            suite = _run_attacks(activity, shards, model, data, cert, eps_values, attack, engine, batch_size, seed, steps)
            summary = summarize(cert, suite, eps_values, attack, engine)
            seconds = time.perf_counter() - start
            if plot_path is not None and shards.is_main:
                activity.stage(f"drawing {plot_path}")
                title = (
                    f"{model_path.name}, {attack} attack ({engine}) on {cert.n:,} {data.name} test points: "
                    "certified radius r and smallest adversarial distance d"
                )
                plot_gap(plot_path, cert.radii_exact, suite.min_distance, title)
        if shards.is_main:
            _render(_Run(model_path, data, cert, suite, summary, attack, engine, seed, seconds, assume_lipschitz), json_path, plot_path)
    if summary.violations:
        raise typer.Exit(EXIT_VIOLATION)


@dataclass
class _Run:
    """What an attack run found, for the report."""

    model_path: Path
    data: ImageDataset
    cert: CertifyResult
    suite: SuiteResult
    summary: AttackSummary
    attack: str
    engine: str
    seed: int
    seconds: float
    assumed_lipschitz: float | None


def _render(run: _Run, json_path: Path | None, plot_path: Path | None) -> None:
    """The accuracy table, tightness, notes, the JSON report and the violations (rank 0 only); prints, never computes."""
    cert, suite, summary = run.cert, run.suite, run.summary
    assumed = run.assumed_lipschitz
    bound_text = f"assumed body bound {assumed:g}" if assumed is not None else f"certified bound {cert.bounds.upper:.6g}"
    title = f"{run.model_path.name}: {run.attack} ({run.engine}) on {cert.n} {run.data.name} test points, {bound_text}"
    console.print(accuracy_table(summary.rows, title))
    if summary.tightness is not None:
        console.print(tightness_table(summary.tightness))
        console.print(f"no adversarial example found for {summary.tightness['no_adversarial_found']} points", highlight=False)
    for message in suite.extra.get("engine_warnings", []):
        console.print(f"[yellow]AutoAttack's own check:[/] {message}", highlight=False)
    if suite.rejected:
        console.print(f"{suite.rejected} points had candidate adversarial examples that failed float64 re-verification (discarded)", highlight=False)
    on = cert.device + (f" (rank 0 of {cert.processes} processes, torchrun)" if cert.processes > 1 else "")
    console.print(f"done in {run.seconds:.1f} s on {on}", highlight=False)
    if json_path is not None:
        report = json_report(
            model=str(run.model_path), sha256=file_sha256(run.model_path), dataset=run.data.name, cert=cert, suite=suite, summary=summary,
            attack=run.attack, engine=run.engine, seconds=run.seconds, seed=run.seed, assumed_lipschitz=assumed,
        )
        write_json(json_path, report)
        console.print(f"wrote {json_path}", highlight=False)
    if plot_path is not None:
        console.print(f"wrote {plot_path}", highlight=False)
    _report_violations(summary)


def _check_outputs(json_path: Path | None, plot_path: Path | None, attack: str, engine: str) -> None:
    """Fail before any work when an output cannot be written or the plot cannot be drawn."""
    check_writable(json_path)
    check_plot_path(plot_path)
    if plot_path is not None:
        if not measures_distance(attack, engine):
            raise CplCertError(
                "--plot needs --attack minnorm or autoattack with --engine native, which measure each point's smallest adversarial distance"
            )


def _bounds(model: CPLNet, assume_lipschitz: float | None) -> LipschitzBounds:
    """cpl-cert's certified bounds, or (auditing only, with a warning) bounds with an assumed body bound."""
    bounds = lipschitz_bounds(model)
    if assume_lipschitz is None:
        return bounds
    err_console.print(
        f"[bold yellow]Warning:[/] certificates computed with an ASSUMED body bound L = {assume_lipschitz:g} "
        "(--assume-lipschitz), not cpl-cert's certified bound; they are being audited, not guaranteed.",
        highlight=False,
    )
    return assume_body_bound(bounds, assume_lipschitz)


def _run_attacks(
    activity: Activity, shards: Shards, model: CPLNet, data: ImageDataset, cert: CertifyResult, eps_values: list[EpsValue],
    attack: str, engine: str, batch_size: int, seed: int, steps: int,
) -> SuiteResult:
    """Attack every point's clean prediction at every radius (split over the processes of a torchrun job);
    the progress line follows each attack iteration."""
    activity.stage(f"attacking ({attack})", cert.n)
    work = SuiteWork.of(attack, engine, len(eps_values), cert.n, batch_size)

    def on_progress(stage: str, done: float, total: float) -> None:
        """The bar and time left follow the whole run; the count, the points done at the radius shown."""
        activity.update(done, total, description=f"attacking: {stage}", count=f"{work.points_done(done, stage):,.0f}/{total:,.0f}")

    return attack_dataset(model, data, cert, eps_values, attack, engine, batch_size, seed, steps, on_progress=on_progress, shards=shards)


def _note_duration(
    model: CPLNet, data: ImageDataset, attack: str, engine: str, steps: int, radii: int, batch_size: int, shards: Shards
) -> None:
    """Before a long run (``LONG_RUN_SECONDS``), say up to how long the attacks may take and how to take a first look sooner."""
    if not shards.is_main:
        return
    seconds = estimate_seconds(model, data, attack, engine, steps, radii, batch_size)
    if seconds is None:
        return
    seconds /= shards.world_size
    if seconds > LONG_RUN_SECONDS:
        what = f"{attack}, {count(len(data), 'point')}, {radii} {'radius' if radii == 1 else 'radii'}"
        err_console.print(
            f"Note: the attacks ({what}) may take up to about {clock(seconds)} here (less as points break); "
            "a smaller --limit takes proportionally less", highlight=False,
        )


def _report_violations(summary: AttackSummary) -> None:
    """List every violated certificate, one row per point (the command then exits with code 3), or say that none was."""
    violations, points = summary.violations, summary.violated_points
    if not violations:
        console.print("[bold green]no certificate violated[/]: every adversarial example found lies at or beyond its certified radius")
        return
    console.print(violations_table(violations))
    shown = ", ".join(str(i) for i in points[:20]) + (" ..." if len(points) > 20 else "")
    err_console.print(
        f"[bold red]Error:[/] an attack contradicted {len(violations)} certificate(s) of {count(len(points), 'test point')} "
        f"(test points {shown}).", highlight=False,
    )
