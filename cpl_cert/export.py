"""ONNX export: the frozen network, with the constants of its certificate in the model's metadata.

The graph maps images (N, C, H, W), float32 in [0, 1] (8-bit pixels / 255), to logits; the input
normalisation is inside it. ``metadata_props`` hold, as JSON, the certified Lipschitz constant
``L[i][j]`` of every logit difference ``f_i - f_j``, so a deployed model computes its own radius
``min over j != top of (f_top - f_j) / L[top][j]``, plus the body bound, normalisation, class names,
input shape and the checkpoint's sha256. Needs the optional ``onnx`` package (``pip install onnx onnxruntime``).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CplCertError
from .files import atomic_write
from .layers import LLNHead
from .lipschitz import LipschitzBounds, lipschitz_bounds
from .models import CPLNet, float64_copy
from .numerics import FP64_SLACK, gamma
from .passes import trace_body
from .rounding import runtime_allowance

INSTALL_HINT = (
    "ONNX export needs the onnx package, which is not installed; install it with pip install onnx onnxruntime "
    "(or pip install '.[onnx]' in the cpl-cert folder)"
)
FORMAT = "cpl-cert-onnx/1"
DEFAULT_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "images", "logits"
CHECK_TOLERANCE = 1e-4
"""Largest |logit difference| (relative to the largest logit, at least 1) accepted between ONNX
Runtime and PyTorch; float32 rounding gives about 1e-6 (docs/deploy.md)."""
PAIR_KEY = "cpl_cert.pair_lipschitz"
ALLOWANCE_KEY = "cpl_cert.runtime_allowance"
RADIUS_RULE = (
    "radius = min over j != top of (logits[top] - logits[j] - 2 * (A[top][j] * ||x|| + B[top][j])) / (pair_lipschitz[top][j] + A[top][j]), "
    "computed in float64 and multiplied by (1 - 1e-9); A, B and norm_limit in cpl_cert.runtime_allowance; x is the [0, 1] float32 "
    "input and ||x|| its l2 norm; top must be the strict largest logit and the logits finite; valid while ||x|| + radius <= norm_limit; "
    "no certificate when radius <= 0. It holds for any runtime that rounds each operation correctly and sums in any order (docs/deploy.md)"
)


@dataclass
class ExportResult:
    """Where the model went and, when onnxruntime was there to run it, how close its logits were."""

    path: Path
    opset: int
    checked_samples: int = 0
    max_logit_gap: float | None = None


def require_onnx() -> None:
    """Fail with one sentence when the ``onnx`` package is missing."""
    if importlib.util.find_spec("onnx") is None:
        raise CplCertError(INSTALL_HINT)


MIN_OPSET = 9
"""The oldest opset the export supports (constant folding needs 9)."""


def supported_opsets() -> tuple[int, int]:
    """The opsets ``export_onnx`` can write: from ``MIN_OPSET`` to the newest both torch's TorchScript
    exporter and the installed ``onnx`` package know (torch refuses a newer one only after tracing)."""
    import onnx

    try:
        from torch.onnx._constants import ONNX_MAX_OPSET as torch_max
    except ImportError:  # a torch without the private constant: the opset this module was tested with
        torch_max = DEFAULT_OPSET
    return MIN_OPSET, min(int(torch_max), int(onnx.defs.onnx_opset_version()))


def check_opset(opset: int) -> None:
    """One sentence for an opset outside ``supported_opsets()``, before any work."""
    low, high = supported_opsets()
    if not low <= opset <= high:
        raise CplCertError(f"--opset must be between {low} and {high} (this torch and onnx), got {opset}")


def has_onnxruntime() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


class _BlockSumPool(nn.Module):
    """``AvgPool2d(k, divisor_override=k)`` as average times k: ONNX's AveragePool has no divisor
    override, and the TorchScript exporter drops it silently (it would divide by k * k)."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.kernel_size) * self.kernel_size


class _FixedLinear(nn.Module):
    """The LLN head with its rows normalised once: the same logits, no normalisation in the graph."""

    def __init__(self, head: LLNHead) -> None:
        super().__init__()
        self.register_buffer("weight", exported_rows(head))
        self.register_buffer("bias", head.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def exported_rows(head: LLNHead) -> torch.Tensor:
    """The LLN head's rows as the graph holds them: normalised in float32 (as the model's own forward pass does)."""
    return head.normalized_weight().detach().float().cpu().clone()


def row_distance_upper(rows: torch.Tensor) -> torch.Tensor:
    """``D[i, j] >= ||r_i - r_j||_2`` in exact arithmetic for float32 rows ``r`` (float64, diagonal 0).

    Why rigorous: in float64 each difference of two float32 numbers is off by at most u = 2^-53
    relative and cannot underflow (float32 values are multiples of 2^-149, so a non-zero difference
    squares to at least 2^-298), each square adds one rounding and any summation order n - 1, so the
    computed sum S is within gamma_{n+2} of the true one; the square root adds one more. Then
    ``true <= fl(sqrt S) / ((1 - u) (1 - gamma_{n+2})) <= fl(sqrt S) (1 + gamma_{2n+5})`` (Higham,
    lemma 3.3), and ``FP64_SLACK`` covers the two float64 products of the bound itself.
    """
    if rows.dtype != torch.float32:
        raise CplCertError(f"the exported head rows must be float32, got {rows.dtype}")
    r = rows.detach().cpu().double()  # exact
    k, n = r.shape
    differences = [r[i] - r for i in range(k)]
    sums = torch.stack([(d * d).sum(dim=1) for d in differences])
    return sums.sqrt() * (1.0 + gamma(2 * n + 5, torch.float64)) * (1.0 + FP64_SLACK)


def exported_pair_lipschitz(rows: torch.Tensor, body_upper: float) -> torch.Tensor:
    """``L[i, j]``: a certified Lipschitz constant of ``f_i - f_j`` for an LLN head exported as ``rows`` (float32)."""
    pairs = row_distance_upper(rows) * body_upper * (1.0 + FP64_SLACK)
    off_diagonal = ~torch.eye(pairs.shape[0], dtype=torch.bool)
    if not bool(torch.isfinite(pairs).all() and (pairs[off_diagonal] > 0).all()):
        raise CplCertError("two rows of the exported LLN head are equal (or the bound is not finite); no radius can be certified from them")
    return pairs


def deployable(model: CPLNet) -> nn.Module:
    """A float32 CPU copy of the frozen ``model`` computing the same logits, ready to trace."""
    copied = copy.deepcopy(model).cpu().float().eval()
    copied.pool = _BlockSumPool(model.config.pool)
    if isinstance(copied.head, LLNHead):
        copied.head = _FixedLinear(copied.head)
    for parameter in copied.parameters():
        parameter.requires_grad_(False)
    return copied


def onnx_metadata(model: CPLNet, meta: dict[str, Any], sha256: str, bounds: LipschitzBounds | None = None) -> dict[str, str]:
    """The ``metadata_props`` of the exported model (all values strings; structured ones JSON)."""
    from .version import __version__
    bounds = bounds or lipschitz_bounds(model)
    config = model.config
    dataset = meta.get("dataset") or {}
    classes = dataset.get("classes") if isinstance(dataset.get("classes"), list) else [str(i) for i in range(config.num_classes)]
    std = list(config.std) if config.std else [1.0] * len(config.mean)
    head = model.head
    pairs = exported_pair_lipschitz(exported_rows(head), bounds.body_upper) if isinstance(head, LLNHead) else bounds.pair_lipschitz()
    allowance = runtime_allowance_metadata(model, bounds)
    return {
        "cpl_cert.format": FORMAT,
        "cpl_cert.version": __version__,
        "cpl_cert.checkpoint_sha256": sha256,
        "cpl_cert.dataset": str(dataset.get("name", "")),
        "cpl_cert.classes": json.dumps(classes),
        "cpl_cert.input_shape": json.dumps(list(config.input_shape)),
        "cpl_cert.input": json.dumps({"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32", "range": [0.0, 1.0], "scale": "8-bit pixel / 255"}),
        "cpl_cert.normalization": json.dumps({"mean": list(config.mean), "std": std, "in_graph": True}),
        "cpl_cert.head": config.head,
        "cpl_cert.body_lipschitz": repr(float(bounds.body_upper)),
        "cpl_cert.lipschitz_upper": repr(float(bounds.upper)),
        PAIR_KEY: json.dumps(pairs.tolist()),
        ALLOWANCE_KEY: json.dumps(allowance),
        "cpl_cert.radius": RADIUS_RULE,
    }


def runtime_allowance_metadata(model: CPLNet, bounds: LipschitzBounds) -> dict[str, Any]:
    """``A``, ``B`` and ``norm_limit`` of the deployed radius rule: the exported graph's logit differences,
    computed by any correctly rounded float32 runtime, are within ``A ||x|| + B`` of exact (``runtime_allowance``)."""
    from .certification import certificate_constants

    _, constants = certificate_constants(model, bounds)
    head = model.head
    if isinstance(head, LLNHead):
        rows = exported_rows(head)
        pairs = row_distance_upper(rows)
        row_norm = rows.double().norm(dim=1) * (1.0 + gamma(rows.shape[1] + 2, torch.float64) + FP64_SLACK)
        bias = head.bias.detach().double().cpu()
    else:
        pairs = constants.head_pairs.cpu()
        row_norm = bias = torch.zeros(pairs.shape[0], dtype=torch.float64)
    limit = 2.0 * math.sqrt(math.prod(model.config.input_shape))  # inputs in the pixel box and balls of their size
    model64 = float64_copy(model).cpu()
    with torch.no_grad():
        _, origin = trace_body(model64, torch.zeros((1, *model.config.input_shape), dtype=torch.float64))
    slope, offset = runtime_allowance(constants, origin, pairs, row_norm.cpu(), bias.cpu(), limit)
    return {"A": slope.tolist(), "B": offset.tolist(), "norm_limit": limit}


def _graph_tensor(proto: Any, name: str) -> torch.Tensor | None:
    """The value of an initializer or ``Constant`` output called ``name`` in ``proto``'s graph, as stored."""
    from onnx import numpy_helper

    for init in proto.graph.initializer:
        if init.name == name:
            return torch.from_numpy(numpy_helper.to_array(init).copy())
    for node in proto.graph.node:
        if node.op_type == "Constant" and list(node.output) == [name]:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            return None if value is None else torch.from_numpy(numpy_helper.to_array(value).copy())
    return None


def graph_head_rows(proto: Any) -> torch.Tensor:
    """The head's weight rows (K, width) read back from the exported graph: the matrix of the
    ``Gemm`` (or ``MatMul`` + ``Add``) that produces the logits, oriented as ``logits = rows @ x + b``."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    node = producers.get(OUTPUT_NAME)
    if node is not None and node.op_type == "Add":
        node = next((producers[i] for i in node.input if i in producers and producers[i].op_type == "MatMul"), None)
    attributes = {a.name: a for a in node.attribute} if node is not None else {}
    plain = "transA" not in attributes or attributes["transA"].i == 0
    plain = plain and ("alpha" not in attributes or attributes["alpha"].f == 1.0)
    weight = _graph_tensor(proto, node.input[1]) if node is not None and node.op_type in ("Gemm", "MatMul") and plain else None
    if weight is None or weight.dim() != 2 or weight.dtype != torch.float32:
        raise CplCertError("the exported graph's LLN head has no float32 weight matrix cpl-cert can read back; nothing was written")
    trans_b = "transB" in attributes and attributes["transB"].i == 1
    return weight if trans_b else weight.T.contiguous()


def _write(module: nn.Module, example: torch.Tensor, tmp: str, metadata: dict[str, str], opset: int) -> None:
    """Export ``module`` to ``tmp``; an LLN head's pair constants come from the rows the written graph holds."""
    import onnx

    with warnings.catch_warnings():  # the TorchScript exporter's notices are not the caller's concern
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), tmp, dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    proto = onnx.load(tmp)
    if isinstance(getattr(module, "head", None), _FixedLinear):
        rows = graph_head_rows(proto)
        if "cpl_cert.body_lipschitz" not in metadata:
            raise CplCertError("the ONNX metadata lacks cpl_cert.body_lipschitz; build it with cpl_cert.onnx_metadata")
        metadata = {**metadata, PAIR_KEY: json.dumps(exported_pair_lipschitz(rows, float(metadata["cpl_cert.body_lipschitz"])).tolist())}
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, tmp)


def _check(tmp: str, model: CPLNet, probe: torch.Tensor) -> float:
    """Largest |logit difference| between ONNX Runtime and cpl-cert's model on ``probe``; refuses a real mismatch."""
    device = next(iter(model.buffers())).device
    with torch.inference_mode():
        expected = model(probe.to(device)).float().cpu()
    gap = float((onnx_logits(tmp, probe) - expected).abs().max())
    if not gap <= CHECK_TOLERANCE * max(1.0, float(expected.abs().max())):
        raise CplCertError(f"the exported model's logits differ from cpl-cert's by {gap:.3g} under onnxruntime; nothing was written")
    return gap


def export_onnx(
    model: CPLNet, path: str | os.PathLike[str], metadata: dict[str, str], opset: int = DEFAULT_OPSET, check_samples: int = 64
) -> ExportResult:
    """Write the frozen ``model`` as ONNX to ``path`` (atomically), with ``metadata`` as its ``metadata_props``.

    When onnxruntime is installed, the file is run on ``check_samples`` random inputs before it
    replaces ``path``; logits off by more than float32 rounding (``CHECK_TOLERANCE``) abort the export.
    For an LLN head, ``cpl_cert.pair_lipschitz`` is computed from the head rows read back from the
    written graph (``graph_head_rows``), so it bounds the weights the file holds.
    """
    require_onnx()
    check_opset(opset)
    module = deployable(model)
    generator = torch.Generator().manual_seed(0)
    example = torch.rand((2, *model.config.input_shape), generator=generator)
    probe = torch.rand((check_samples, *model.config.input_shape), generator=generator)
    result = ExportResult(Path(path), opset)

    def write(tmp: str) -> None:
        _write(module, example, tmp, metadata, opset)
        if check_samples and has_onnxruntime():
            result.max_logit_gap, result.checked_samples = _check(tmp, model, probe), check_samples

    atomic_write(path, write)
    return result


def onnx_logits(path: str | os.PathLike[str], images: torch.Tensor) -> torch.Tensor:
    """Logits of an exported model under ONNX Runtime (CPU) for images in [0, 1] (uint8 are divided by 255)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.cpu().numpy()})
    return torch.from_numpy(logits)
