"""``cpl-cert import``: convert a checkpoint of the CPL paper's reference code and report its real bound."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..checkpoint import save_checkpoint
from ..errors import CplCertError
from ..reference import EVAL_ITERS, STEPS_MODES, ImportedModel, import_reference
from .common import Threads, check_writable, console, err_console, handle_errors, set_threads
from .progress import Activity
from .table import Table

SOURCE_LABELS = {"eval_sv_max": "eval_sv_max", f"power-iteration-{EVAL_ITERS}": f"{EVAL_ITERS} it."}


def layer_table(imported: ImportedModel) -> Table:
    """One row per CPL layer: the reference's sigma and step, the bound that step gives, the written step."""
    p = imported.provenance
    table = Table(
        title=f"CPL layers of {p['source']}",
        caption=f"sigma from: eval_sv_max (cached by the reference) or {EVAL_ITERS} power iterations from pm.u (it.)",
    )
    for column in ("layer", "sigma (ref.)", "from", "step (ref.)", "bound (ref. step)", "step (written)"):
        table.add_column(column, justify="left" if column in ("layer", "from") else "right")
    arch = imported.architecture
    names = [f"convs.{i}" for i in range(arch.depth)] + [f"dense.{j}" for j in range(arch.depth_linear)]
    rows = zip(
        names,
        p["reference_sigmas"],
        p["reference_sigma_sources"],
        p["reference_steps"],
        p["reference_steps_layer_bounds"],
        p["written_steps"],
        strict=True,
    )
    for name, sigma, source, ref_step, bound, step in rows:
        style = "bold red" if bound > 1.0 + 1e-12 else None
        table.add_row(name, f"{sigma:.6g}", SOURCE_LABELS.get(source, source), f"{ref_step:.6g}", f"{bound:.8g}", f"{step:.6g}", style=style)
    return table


def summary_lines(imported: ImportedModel) -> list[str]:
    """What was read, and the two certified body bounds (reference steps, written steps)."""
    p, a = imported.provenance, imported.architecture
    head = "LLN head" if a.lln else "truncation head"
    dense = f"{a.depth_linear} dense (inner {a.n_features})" if a.depth_linear else "0 dense"
    assumed = p["reference_assumed_body_bound"]
    lines = [
        (
            f"read {p['source']} (sha256 {p['sha256']}): {a.depth} conv CPL layers ({a.num_channels} channels, "
            f"inner {a.conv_size}), {dense}, {head}, {a.num_classes} classes"
        ),
        (
            f"reference steps: certified body bound [bold]{p['reference_steps_body_bound']:.6g}[/] "
            f"(the reference code certifies as if it were {assumed:.6g})"
        ),
    ]
    if p["steps"] == "certified":
        ratios = [new / old for new, old in zip(p["written_steps"], p["reference_steps"], strict=True)]
        change = f"; steps changed by {100 * (min(ratios) - 1):+.3g} % to {100 * (max(ratios) - 1):+.3g} %" if ratios else ""
        lines.append(f"certified steps (written): certified body bound [bold]{p['written_body_bound']:.6g}[/]{change}")
    return lines


@handle_errors
def import_command(
    source: Annotated[
        Path,
        typer.Argument(help="A reference-code checkpoint: torch.save of the state_dict (e.g. best_model.pt).", metavar="FILE", show_default=False),
    ],
    dataset: Annotated[
        str, typer.Option("--dataset", metavar="NAME", help="cifar10 or cifar100: what the reference run trained on.", show_default=False)
    ],
    out: Annotated[Path, typer.Option("--out", metavar="FILE", help="The cpl-cert checkpoint to write (.safetensors).", show_default=False)],
    norm_input: Annotated[bool, typer.Option("--norm-input", help="The run used --norm_input (inputs divided by the dataset std).")] = False,
    lln: Annotated[bool, typer.Option("--lln", help="The run used --lln (last-layer-normalised head).")] = False,
    steps: Annotated[
        str,
        typer.Option(
            "--steps", metavar="MODE",
            help="certified: re-freeze with certified spectral bounds (provably 1-Lipschitz layers); "
            "reference: keep the reference's own steps (its exact function; bound reported, usually above 1).",
        ),
    ] = "certified",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists (by default an existing file is refused).")] = False,
    threads: Threads = None,
) -> None:
    """Convert a checkpoint of the CPL paper's reference code into a cpl-cert checkpoint.

    The file is read with torch.load(weights_only=True) only: no code from it runs. The architecture
    is inferred from the tensor shapes and every key is checked. Both certified body bounds are
    reported (with the reference's steps, and with the written steps) and recorded in the
    checkpoint's metadata (training.provenance, shown by cpl-cert info).
    """
    set_threads(threads)
    if steps not in STEPS_MODES:
        raise CplCertError(f"--steps must be certified or reference, got {steps!r}")
    check_writable(out)
    if out.exists() and not overwrite:
        raise CplCertError(f"{out} already exists; pass --overwrite to replace it")
    with Activity(err_console) as activity:
        activity.stage(f"importing {source.name}: reading, checking every key, computing the certified bounds")
        imported = import_reference(source, dataset, norm_input=norm_input, lln=lln, steps=steps)  # type: ignore[arg-type]
    console.print(layer_table(imported))
    for line in summary_lines(imported):
        console.print(line, highlight=False)
    p = imported.provenance
    if steps == "reference" and p["written_body_bound"] > p["reference_assumed_body_bound"] * (1 + 1e-12):
        err_console.print(
            f"[bold yellow]Warning:[/] with the reference steps the network is not {p['reference_assumed_body_bound']:.6g}-Lipschitz; "
            "radii computed as if it were overstate the certificates (cpl-cert certify uses the certified bound)",
            highlight=False,
        )
    with Activity(err_console) as activity:
        activity.stage(f"writing {out}")
        save_checkpoint(imported.model, out, dataset=imported.dataset, training={"provenance": p})
    console.print(f"wrote {out} (--steps {steps})", highlight=False)
