"""``cpl-cert import``: convert a checkpoint of the CPL paper's reference code or of the SLL code and report its real bound."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..checkpoint import save_checkpoint
from ..errors import CplCertError
from ..reference import EVAL_ITERS, ImportedModel, check_steps_mode, import_reference
from ..sll_reference import import_sll
from .common import Threads, check_writable, console, err_console, handle_errors, set_threads
from .progress import Activity
from .table import Table

SOURCE_LABELS = {"eval_sv_max": "eval_sv_max", f"power-iteration-{EVAL_ITERS}": f"{EVAL_ITERS} it."}
SOURCES = ("cpl", "sll")


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


def sll_layer_table(imported: ImportedModel) -> Table:
    """One row per SLL layer: certified ||diag(sqrt t) W|| and layer bound with the file's t, then with the written t."""
    p = imported.provenance
    table = Table(
        title=f"SLL layers of {p['source']} ({imported.architecture.version} layer version)",
        caption="||A||: certified upper bound of ||diag(sqrt t) W||; layer bound max(1, 2 ||A||^2 - 1)",
    )
    for column in ("layer", "||A|| (file's t)", "bound (file's t)", "||A|| (written)", "bound (written)", "t written / file"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    rows = zip(p["layers"], p["reference_scaled_sigmas"], p["reference_layer_bounds"], p["written_scaled_sigmas"],
               p["written_layer_bounds"], p["written_t_ratios"], strict=True)
    for name, a_ref, bound_ref, a_new, bound_new, (low, high) in rows:
        ratio = f"{low:.8g}" if f"{low:.8g}" == f"{high:.8g}" else f"{low:.8g} .. {high:.8g}"
        style = "bold red" if bound_ref > 1.0 + 1e-12 else None
        table.add_row(name, f"{a_ref:.8g}", f"{bound_ref:.8g}", f"{a_new:.8g}", f"{bound_new:.8g}", ratio, style=style)
    return table


def sll_summary_lines(imported: ImportedModel) -> list[str]:
    """What was read, and the certified body bounds with the file's rescaling and with the written one."""
    p, a = imported.provenance, imported.architecture
    head = "LLN head" if a.lln else "truncation head"
    lines = [
        (
            f"read {p['source']} (sha256 {p['sha256']}): SLL code, {a.version} layer version, {a.n_conv} conv SLL layers "
            f"({a.w} channels, inner {a.conv_inner}), {a.n_dense} dense (inner {a.dense_inner}), {head}, {a.num_classes} classes, "
            f"{a.size}x{a.size} inputs"
        ),
        f"file's rescaling: certified body bound [bold]{p['reference_body_bound']:.8g}[/] (the SLL code certifies as if it were 1)",
    ]
    if p["steps"] == "certified":
        lines.append(f"certified rescaling (written): certified body bound [bold]{p['written_body_bound']:.8g}[/]")
    return lines


def _run_import(source: Path, origin: str, dataset: str, norm_input: bool, lln: bool, steps: str) -> ImportedModel:
    """The import of ``--from``; the SLL code's options differ from the CPL code's, so bad combinations are refused."""
    if origin == "cpl":
        return import_reference(source, dataset, norm_input=norm_input, lln=lln, steps=steps)  # type: ignore[arg-type]
    if norm_input:
        raise CplCertError("--norm-input is for the CPL reference code; the SLL code subtracts the mean only (std 1)")
    imported = import_sll(source, dataset, steps=steps)  # type: ignore[arg-type]
    if lln and not imported.architecture.lln:
        raise CplCertError(f"{source} has no LLN head (the earlier SLL version's truncation head); drop --lln")
    return imported


def _print_report(imported: ImportedModel, origin: str, steps: str) -> None:
    """The layer table, the summary and, for the file's own steps above the assumed bound, a warning."""
    console.print(layer_table(imported) if origin == "cpl" else sll_layer_table(imported))
    for line in summary_lines(imported) if origin == "cpl" else sll_summary_lines(imported):
        console.print(line, highlight=False)
    p = imported.provenance
    if steps == "reference" and p["written_body_bound"] > p["reference_assumed_body_bound"] * (1 + 1e-12):
        err_console.print(
            f"[bold yellow]Warning:[/] with the {'reference steps' if origin == 'cpl' else 'file' + chr(39) + 's rescaling'} the network is not "
            f"{p['reference_assumed_body_bound']:.6g}-Lipschitz; radii computed as if it were overstate the certificates "
            "(cpl-cert certify uses the certified bound)",
            highlight=False,
        )


@handle_errors
def import_command(
    source: Annotated[
        Path,
        typer.Argument(
            help="A torch.save file: the CPL reference code's state_dict (e.g. best_model.pt) or the SLL code's training checkpoint.",
            metavar="FILE", show_default=False,
        ),
    ],
    dataset: Annotated[
        str,
        typer.Option("--dataset", metavar="NAME", help="cifar10 or cifar100 (or, with --from sll, tiny-imagenet): what the run trained on.",
                     show_default=False),
    ],
    out: Annotated[Path, typer.Option("--out", metavar="FILE", help="The cpl-cert checkpoint to write (.safetensors).", show_default=False)],
    origin: Annotated[
        str, typer.Option("--from", metavar="CODE", help="cpl: the CPL paper's reference code; sll: the SLL code (both layer versions).")
    ] = "cpl",
    norm_input: Annotated[bool, typer.Option("--norm-input", help="The run used --norm_input (inputs divided by the dataset std).")] = False,
    lln: Annotated[bool, typer.Option("--lln", help="The run used --lln (last-layer-normalised head).")] = False,
    steps: Annotated[
        str,
        typer.Option(
            "--steps", metavar="MODE",
            help="certified: re-freeze with certified spectral bounds (provably 1-Lipschitz layers); "
            "reference: keep the file's own steps or SLL rescaling (its exact function; bound reported, above 1 where it is).",
        ),
    ] = "certified",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists (by default an existing file is refused).")] = False,
    threads: Threads = None,
) -> None:
    """Convert a checkpoint of the CPL paper's reference code (--from cpl) or of the SLL code (--from sll) into a
    cpl-cert checkpoint.

    The file is read with torch.load(weights_only=True) only: no code from it runs. The architecture
    (and, for SLL, the layer version) is inferred from the tensor names and shapes and every key is
    checked. Both certified body bounds are reported (with the file's own steps or rescaling, and with
    the written ones) and recorded in the checkpoint's metadata (training.provenance, shown by cpl-cert info).
    """
    set_threads(threads)
    check_steps_mode(steps)
    if origin not in SOURCES:
        raise CplCertError(f"--from must be cpl or sll, got {origin!r}")
    check_writable(out)
    if out.exists() and not overwrite:
        raise CplCertError(f"{out} already exists; pass --overwrite to replace it")
    with Activity(err_console) as activity:
        activity.stage(f"importing {source.name}: reading, checking every key, computing the certified bounds")
        imported = _run_import(source, origin, dataset, norm_input, lln, steps)
    _print_report(imported, origin, steps)
    with Activity(err_console) as activity:
        activity.stage(f"writing {out}")
        save_checkpoint(imported.model, out, dataset=imported.dataset, training={"provenance": imported.provenance})
    console.print(f"wrote {out} (--steps {steps})", highlight=False)
