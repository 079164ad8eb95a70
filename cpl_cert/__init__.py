"""cpl-cert: certified l2 robustness for 1-Lipschitz Convex Potential Layer networks."""

from .certify import CertifyResult, certify, parse_eps
from .checkpoint import load_checkpoint, read_metadata, save_checkpoint
from .data import ImageDataset, load_dataset
from .errors import CplCertError
from .export import ExportResult, export_onnx, onnx_metadata
from .layers import CPLConv2d, CPLLinear, LLNHead, TruncationHead
from .lipschitz import LipschitzBounds, lipschitz_bounds, lipschitz_lower_bound
from .models import PRESETS, CPLNet, ModelConfig, build_model, count_parameters
from .predict import PredictResult, predict
from .reference import ImportedModel, import_reference
from .spectral import freeze, is_frozen

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CertifyResult",
    "ImageDataset",
    "certify",
    "load_dataset",
    "parse_eps",
    "CPLConv2d",
    "CPLLinear",
    "CPLNet",
    "CplCertError",
    "ExportResult",
    "ImportedModel",
    "LLNHead",
    "LipschitzBounds",
    "ModelConfig",
    "PredictResult",
    "TruncationHead",
    "build_model",
    "count_parameters",
    "export_onnx",
    "freeze",
    "import_reference",
    "is_frozen",
    "lipschitz_bounds",
    "lipschitz_lower_bound",
    "load_checkpoint",
    "onnx_metadata",
    "predict",
    "read_metadata",
    "save_checkpoint",
]
