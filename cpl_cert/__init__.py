"""cpl-cert: certified l2 robustness for 1-Lipschitz Convex Potential Layer networks.

The public names load on first use (PEP 562): ``import cpl_cert`` does not wait for torch, so the
command line can answer a Ctrl-C at any moment of its start with one sentence.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from .version import __version__ as __version__

_EXPORTS = {
    "certification": ("CertifyResult", "certify"),
    "checkpoint": ("load_checkpoint", "read_metadata", "save_checkpoint"),
    "data": ("ImageDataset", "load_dataset"),
    "eps": ("EpsValue", "parse_eps"),
    "errors": ("CplCertError",),
    "export": ("ExportResult", "export_onnx", "onnx_metadata"),
    "freezing": ("freeze", "is_frozen"),
    "layers": ("CPLConv2d", "CPLLinear", "LLNHead", "SLLConv2d", "SLLLinear", "TruncationHead"),
    "lipschitz": ("LipschitzBounds", "lipschitz_bounds", "lipschitz_lower_bound"),
    "models": ("PRESETS", "CPLNet", "ModelConfig", "build_model", "count_parameters"),
    "prediction": ("PredictResult", "predict"),
    "reference": ("ImportedModel", "import_reference"),
    "sll_reference": ("import_sll",),
}
_SOURCE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "PRESETS", "CPLConv2d", "CPLLinear", "CPLNet", "CertifyResult", "CplCertError", "EpsValue", "ExportResult", "ImageDataset", "ImportedModel",
    "LLNHead", "LipschitzBounds", "ModelConfig", "PredictResult", "SLLConv2d", "SLLLinear", "TruncationHead", "build_model", "certify",
    "count_parameters", "export_onnx", "freeze", "import_reference", "import_sll", "is_frozen", "lipschitz_bounds", "lipschitz_lower_bound",
    "load_checkpoint", "load_dataset", "onnx_metadata", "parse_eps", "predict", "read_metadata", "save_checkpoint",
]

if TYPE_CHECKING:
    from .certification import CertifyResult, certify
    from .checkpoint import load_checkpoint, read_metadata, save_checkpoint
    from .data import ImageDataset, load_dataset
    from .eps import EpsValue, parse_eps
    from .errors import CplCertError
    from .export import ExportResult, export_onnx, onnx_metadata
    from .freezing import freeze, is_frozen
    from .layers import CPLConv2d, CPLLinear, LLNHead, SLLConv2d, SLLLinear, TruncationHead
    from .lipschitz import LipschitzBounds, lipschitz_bounds, lipschitz_lower_bound
    from .models import PRESETS, CPLNet, ModelConfig, build_model, count_parameters
    from .prediction import PredictResult, predict
    from .reference import ImportedModel, import_reference
    from .sll_reference import import_sll


def __getattr__(name: str) -> Any:
    """Load a public name (or a submodule such as ``cpl_cert.data``) the first time it is used."""
    if name in _SOURCE:
        value = getattr(importlib.import_module(f".{_SOURCE[name]}", __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SOURCE})

