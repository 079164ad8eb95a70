"""cpl-cert: certified l2 robustness for 1-Lipschitz Convex Potential Layer networks."""

from .certify import CertifyResult, certify, parse_eps
from .checkpoint import load_checkpoint, read_metadata, save_checkpoint
from .data import ImageDataset, load_dataset
from .errors import CplCertError
from .layers import CPLConv2d, CPLLinear, LLNHead, TruncationHead
from .lipschitz import LipschitzBounds, lipschitz_bounds, lipschitz_lower_bound
from .models import PRESETS, CPLNet, ModelConfig, build_model, count_parameters
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
    "LLNHead",
    "LipschitzBounds",
    "ModelConfig",
    "TruncationHead",
    "build_model",
    "count_parameters",
    "freeze",
    "is_frozen",
    "lipschitz_bounds",
    "lipschitz_lower_bound",
    "load_checkpoint",
    "read_metadata",
    "save_checkpoint",
]
