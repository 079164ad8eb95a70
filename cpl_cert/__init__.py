"""cpl-cert: certified l2 robustness for 1-Lipschitz Convex Potential Layer networks.

The public names load on first use (PEP 562): ``import cpl_cert`` does not wait for torch, so the
command line can answer a Ctrl-C at any moment of its start with one sentence.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "certify": ("CertifyResult", "certify"),
    "eps": ("EpsValue", "parse_eps"),
    "checkpoint": ("load_checkpoint", "read_metadata", "save_checkpoint"),
    "data": ("ImageDataset", "load_dataset"),
    "errors": ("CplCertError",),
    "export": ("ExportResult", "export_onnx", "onnx_metadata"),
    "layers": ("CPLConv2d", "CPLLinear", "LLNHead", "SLLConv2d", "SLLLinear", "TruncationHead"),
    "lipschitz": ("LipschitzBounds", "lipschitz_bounds", "lipschitz_lower_bound"),
    "models": ("PRESETS", "CPLNet", "ModelConfig", "build_model", "count_parameters"),
    "predict": ("PredictResult", "predict"),
    "reference": ("ImportedModel", "import_reference"),
    "sll_reference": ("import_sll",),
    "freezing": ("freeze", "is_frozen"),
}
_SOURCE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "PRESETS", "CPLConv2d", "CPLLinear", "CPLNet", "CertifyResult", "CplCertError", "EpsValue", "ExportResult", "ImageDataset", "ImportedModel",
    "LLNHead", "LipschitzBounds", "ModelConfig", "PredictResult", "SLLConv2d", "SLLLinear", "TruncationHead", "build_model", "certify",
    "count_parameters", "export_onnx", "freeze", "import_reference", "import_sll", "is_frozen", "lipschitz_bounds", "lipschitz_lower_bound",
    "load_checkpoint", "load_dataset", "onnx_metadata", "parse_eps", "predict", "read_metadata", "save_checkpoint",
]

if TYPE_CHECKING:
    from .certify import CertifyResult, certify
    from .checkpoint import load_checkpoint, read_metadata, save_checkpoint
    from .data import ImageDataset, load_dataset
    from .eps import EpsValue, parse_eps
    from .errors import CplCertError
    from .export import ExportResult, export_onnx, onnx_metadata
    from .freezing import freeze, is_frozen
    from .layers import CPLConv2d, CPLLinear, LLNHead, SLLConv2d, SLLLinear, TruncationHead
    from .lipschitz import LipschitzBounds, lipschitz_bounds, lipschitz_lower_bound
    from .models import PRESETS, CPLNet, ModelConfig, build_model, count_parameters
    from .predict import PredictResult, predict
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


class _Package(types.ModuleType):
    """Keeps ``cpl_cert.certify`` and ``cpl_cert.predict`` the functions once their modules are imported.

    Importing a submodule binds it on its package; where a function has the module's name, the
    function stays bound instead (as an eager ``from .certify import certify`` would leave it).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in _EXPORTS.get(name, ()):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
