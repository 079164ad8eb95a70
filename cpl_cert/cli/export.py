"""``cpl-cert export``: the frozen network as ONNX, with its certificate constants in the metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..checkpoint import load_checkpoint
from ..export import DEFAULT_OPSET, check_opset, export_onnx, onnx_metadata, require_onnx
from ..files import file_sha256
from ..lipschitz import lipschitz_bounds
from .common import ModelPath, Threads, check_writable, console, count, err_console, handle_errors, set_threads
from .progress import Activity


@handle_errors
def export_command(
    model_path: ModelPath,
    onnx_path: Annotated[Path, typer.Option("--onnx", metavar="FILE", help="The ONNX file to write.", show_default=False)],
    opset: Annotated[int, typer.Option("--opset", metavar="N", help="ONNX opset (9 to the newest this torch and onnx know).")] = DEFAULT_OPSET,
    threads: Threads = None,
) -> None:
    """Write the frozen network as ONNX, with its certificate constants in the model's metadata.

    The graph takes images (N, C, H, W), float32 in [0, 1] (8-bit pixels / 255), normalises them
    itself and returns logits. metadata_props hold the certified Lipschitz constant of every logit
    difference (cpl_cert.pair_lipschitz), the body bound, the input normalisation, the class names,
    the input shape and the checkpoint's sha256, so a deployed model computes its own radius
    min_j (logit[top] - logit[j]) / pair_lipschitz[top][j]. Checked with ONNX Runtime when installed.
    """
    set_threads(threads)
    require_onnx()
    check_opset(opset)
    check_writable(onnx_path)
    with Activity(err_console) as activity:
        activity.stage(f"loading {model_path.name}")
        model, meta = load_checkpoint(model_path)
        activity.stage("computing the certified Lipschitz constants")
        bounds = lipschitz_bounds(model)
        metadata = onnx_metadata(model, meta, file_sha256(model_path), bounds)
        activity.stage(f"exporting to {onnx_path} and checking it with ONNX Runtime")
        result = export_onnx(model, onnx_path, metadata, opset=opset)
    console.print(
        f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.3g} MB, opset {opset}): input 'images' "
        f"(N, {', '.join(map(str, model.config.input_shape))}) in [0, 1], output 'logits' (N, {model.config.num_classes})",
        highlight=False,
    )
    console.print(
        f"metadata: pair Lipschitz matrix {model.config.num_classes}x{model.config.num_classes}, body bound "
        f"{bounds.body_upper:.6g}, network bound {bounds.upper:.6g}, normalisation, classes, sha256",
        highlight=False,
    )
    if result.max_logit_gap is None:
        console.print("onnxruntime is not installed: the file was not run (pip install onnxruntime to check it)", highlight=False)
    else:
        console.print(
            f"onnxruntime check: max |logit difference| {result.max_logit_gap:.3g} on {count(result.checked_samples, 'random input')}",
            highlight=False,
        )
