"""Checkpoints of the SLL code (Araujo et al., araujoalexandre/Lipschitz-SLL-Networks): read safely, convert, audit.

Its trainer saves ``torch.save({'epoch', 'global_step', 'model_state_dict', 'optimizer_state_dict'})`` of
``DataParallel(NormalizedModel(LipschitzNetwork))`` (or DistributedDataParallel: the same ``module.`` prefix).
Only ``model_state_dict`` is used; the file is read with ``torch.load(weights_only=True)`` (no code runs). Two
layer versions exist, told apart by their keys:

- **current** (since the commit "fix numerical stability & Lipschitzness", October 2023): ``model.{i}`` of one
  Sequential: 0 channel padding, then the conv layers (``kernel`` (inner, w, 3, 3), ``bias`` (1, inner, 1, 1),
  ``q``), the pool and Flatten (no tensors), the dense layers (``weight`` (inner, F), ``bias`` (1, inner), ``q``)
  and the LLN head (``weight``, ``bias``). ``t_i = 1 / sum_j |W W^T|_ij q_j / q_i`` with ``q = exp(q)``, and
  ``x - 2 W^T (t * relu(W x + b))``. Its conv layer broadcasts ``q`` and ``1/q`` along the same axis, so they
  cancel: its ``t_i`` is ``1 / sum_j |K K^T|_ij`` (q has no effect; imported as ``q = 1``).
- **earlier**: the CPL reference's layout (``stable_block.{i}``, ``layers_linear.{j}`` from 1, optional
  ``last_last``, each conv and dense tensor again under ``base.1.{i}`` / ``base.2.{j}``); conv ``bias`` (inner,)
  inside the convolution and ``T = 2 / (sum_j |q_j KK^T_ij| / |q_i|)``; dense ``weights`` with
  ``T = 2 / sum_j |(W W^T)_ij| |q_j| / (|q_i| + 1e-6)``, which exceeds the 1-Lipschitz choice where ``|q_i|`` is small.

``--steps reference`` keeps each layer's own rescaling, computed as that code computes it in float32 (its
function, and the certified bound it really has); ``certified`` re-freezes with ``cpl_cert.freeze`` (the exact
SLL formula with the file's ``q``, provably 1-Lipschitz layers).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import SPECS
from .errors import CplCertError
from .files import file_sha256
from .freezing import freeze
from .lipschitz import LipschitzBounds, lipschitz_bounds
from .models import CPLNet, ModelConfig, cpl_layers
from .reference import ImportedModel, StepsMode, check_state_dict, check_steps_mode, read_torch_file
from .sll import scaled_operators
from .spectral import refresh_vector

OLD_EPSILON = 1e-6
"""The earlier dense layer's ``epsilon`` in ``1 / (|q_i| + epsilon)``."""
WRAPPER_KEYS = ("epoch", "global_step", "model_state_dict", "optimizer_state_dict")
PREFIXES = ("module.model.", "model.", "")
"""Key prefixes tried, longest first: DataParallel/DDP + NormalizedModel, NormalizedModel alone, the bare network."""


@dataclass(frozen=True)
class SLLData:
    """What the SLL code's reader applies (not stored in its files): classes, input size, means (std 1)."""

    num_classes: int
    size: int
    mean: tuple[float, ...]


SLL_DATA = {
    "cifar10": SLLData(10, 32, (0.4913, 0.4821, 0.4465)),
    "cifar100": SLLData(100, 32, (0.5071, 0.4865, 0.4409)),
    "tiny-imagenet": SLLData(200, 64, (0.485, 0.456, 0.406)),
}


@dataclass(frozen=True)
class SLLArchitecture:
    """An SLL network as read from a file: version (``current`` or ``earlier``) and sizes."""

    version: str
    n_conv: int
    n_dense: int
    w: int
    conv_inner: int
    dense_inner: int
    lln: bool
    num_classes: int
    size: int

    @property
    def features(self) -> int:
        return self.w * (self.size // 4) ** 2

    def layers(self) -> list[tuple[str, str, str]]:
        """(cpl-cert name, source key prefix, weight name) of each SLL layer in forward order."""
        if self.version == "current":
            convs = [(f"convs.{i}", f"model.{i + 1}", "kernel") for i in range(self.n_conv)]
            return convs + [(f"dense.{j}", f"model.{self.n_conv + 3 + j}", "weight") for j in range(self.n_dense)]
        convs = [(f"convs.{i}", f"stable_block.{i}", "kernel") for i in range(self.n_conv)]
        return convs + [(f"dense.{j}", f"layers_linear.{j + 1}", "weights") for j in range(self.n_dense)]

    def head_prefix(self) -> str:
        return f"model.{self.n_conv + 3 + self.n_dense}" if self.version == "current" else "last_last"


# --- reading ------------------------------------------------------------------------------------------------
def load_sll_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """``model_state_dict`` of a training checkpoint (or a bare state_dict), every top-level entry checked."""
    saved = read_torch_file(path, "the SLL code")
    if isinstance(saved, dict) and "model_state_dict" in saved:
        extra = [key for key in saved if key not in WRAPPER_KEYS]
        if extra:
            raise CplCertError(f"{path} has an entry {extra[0]!r} beside model_state_dict that an SLL training checkpoint does not have")
        saved = saved["model_state_dict"]
    state = check_state_dict(saved, path)
    if not state:
        raise CplCertError(f"{path} holds an empty state_dict")
    return state


def _layout(keys: list[str]) -> str | None:
    """``current`` or ``earlier`` when every key (prefix removed) belongs to that version's layout."""
    if all(re.fullmatch(r"model\.\d+\.(kernel|weight|bias|q)", key) for key in keys):
        return "current"
    if all(re.fullmatch(r"(stable_block\.\d+|layers_linear\.\d+|base\.[12]\.\d+|last_last)\.(kernel|weights|weight|bias|q)", key) for key in keys):
        return "earlier"
    return None


def detect_version(state: dict[str, torch.Tensor], path: Path) -> tuple[str, str, dict[str, torch.Tensor]]:
    """``(version, prefix, tensors without the prefix)``: the longest accepted prefix whose stripped keys fit a layout."""
    for prefix in PREFIXES:
        if all(key.startswith(prefix) for key in state):
            stripped = {key[len(prefix):]: value for key, value in state.items()}
            version = _layout(list(stripped))
            if version is not None:
                return version, prefix, stripped
    first = next(iter(state))
    if any(key.endswith((".eval_sv_max", ".pm.u")) for key in state):
        raise CplCertError(f"{path} is a state_dict of the CPL reference code (it has eval_sv_max and pm.u tensors); use --from cpl")
    raise CplCertError(
        f"{path} is not an SLL network's state_dict: its keys (the first is {first}) fit neither the current layout "
        "(module.model.model.{i}.kernel|weight|bias|q) nor the earlier one (module.model.stable_block.{i}, layers_linear.{j}, last_last)"
    )


def _count(state: dict[str, torch.Tensor], template: str, start: int) -> int:
    index = start
    while template.format(index) in state:
        index += 1
    return index - start


def infer_sll_architecture(state: dict[str, torch.Tensor], version: str, dataset: str, path: Path, prefix: str) -> SLLArchitecture:
    """Depths and widths from the keys and shapes; the input size and classes from ``dataset``."""
    data = SLL_DATA[dataset]
    if version == "current":
        n_conv = _count(state, "model.{}.kernel", 1)
        n_dense = _count(state, "model.{}.q", n_conv + 3)
        head, first_dense = f"model.{n_conv + 3 + n_dense}.weight", f"model.{n_conv + 3}.weight"
    else:
        n_conv = _count(state, "stable_block.{}.kernel", 0)
        n_dense = _count(state, "layers_linear.{}.weights", 1)
        head, first_dense = "last_last.weight", "layers_linear.1.weights"
    lln = head in state
    if version == "current" and not lln:
        raise CplCertError(f"{path} lacks the LLN head {prefix}{head} that every current SLL network has")
    conv_inner = dense_inner = 0
    if n_conv:
        kernel = state["model.1.kernel" if version == "current" else "stable_block.0.kernel"]
        if kernel.dim() != 4:
            raise CplCertError(f"{path}: the first conv kernel has shape {tuple(kernel.shape)}, not (inner, channels, 3, 3)")
        conv_inner, w = int(kernel.shape[0]), int(kernel.shape[1])
    else:
        source = first_dense if n_dense else head
        width = int(state[source].shape[-1]) if source in state else 0
        w = width // (data.size // 4) ** 2
    if n_dense:
        dense_inner = int(state[first_dense].shape[0])
    return SLLArchitecture(version, n_conv, n_dense, w, conv_inner, dense_inner, lln, data.num_classes, data.size)


def expected_sll_shapes(arch: SLLArchitecture) -> dict[str, tuple[int, ...]]:
    """Every key (without prefix) of the network's state_dict and its shape."""
    current = arch.version == "current"
    conv_bias = (1, arch.conv_inner, 1, 1) if current else (arch.conv_inner,)
    dense_bias = (1, arch.dense_inner) if current else (arch.dense_inner,)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, source, weight in arch.layers():
        conv = name.startswith("convs")
        inner = arch.conv_inner if conv else arch.dense_inner
        tensors = {weight: (inner, arch.w, 3, 3) if conv else (inner, arch.features), "bias": conv_bias if conv else dense_bias, "q": (inner,)}
        for key, shape in tensors.items():
            shapes[f"{source}.{key}"] = shape
            if not current:
                twin = source.replace("stable_block.", "base.1.").replace("layers_linear.", "base.2.")
                shapes[f"{twin}.{key}"] = shape
    if arch.lln:
        shapes[f"{arch.head_prefix()}.weight"] = (arch.num_classes, arch.features)
        shapes[f"{arch.head_prefix()}.bias"] = (arch.num_classes,)
    return shapes


def check_sll_tensors(state: dict[str, torch.Tensor], arch: SLLArchitecture, path: Path, prefix: str, dataset: str) -> None:
    """Every key present, none extra, every shape right, every value finite, both copies equal (earlier version)."""
    expected = expected_sll_shapes(arch)
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    head = f"{arch.head_prefix()}.weight"
    if arch.lln and state[head].shape[0] != arch.num_classes:
        raise CplCertError(f"{path}: the LLN head predicts {state[head].shape[0]} classes but {dataset} has {arch.num_classes}; check --dataset")
    if missing:
        raise CplCertError(f"{path} lacks the tensor {prefix}{missing[0]} ({len(missing)} missing) that an SLL network of its shape has")
    if unexpected:
        raise CplCertError(f"{path} has a tensor {prefix}{unexpected[0]} ({len(unexpected)} unexpected) that an SLL network does not have")
    for key, shape in expected.items():
        tensor = state[key]
        if tuple(tensor.shape) != shape:
            raise CplCertError(
                f"{path}: tensor {prefix}{key} has shape {tuple(tensor.shape)}, an SLL network of its shape on {dataset} "
                f"({arch.size}x{arch.size} inputs) needs {shape}"
            )
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise CplCertError(f"{path}: tensor {prefix}{key} is not floating point or contains NaN or infinite values")
        twin = re.sub(r"^stable_block\.", "base.1.", re.sub(r"^layers_linear\.", "base.2.", key))
        if twin != key and not torch.equal(tensor, state[twin]):
            raise CplCertError(f"{path}: {prefix}{key} and {prefix}{twin} should be the same tensor but differ")


def read_sll(path: Path, dataset: str) -> tuple[dict[str, torch.Tensor], SLLArchitecture]:
    """The checked tensors (keys without prefix, float32) and the architecture of an SLL file."""
    if dataset not in SLL_DATA:
        raise CplCertError(f"the SLL code trains on {', '.join(SLL_DATA)}, not {dataset!r}")
    version, prefix, state = detect_version(load_sll_state_dict(path), path)
    arch = infer_sll_architecture(state, version, dataset, path, prefix)
    if arch.w < 3:
        raise CplCertError(f"{path} has {arch.w} channels, fewer than the 3 input channels an SLL network pads from")
    check_sll_tensors(state, arch, path, prefix, dataset)
    return {key: value.float() for key, value in state.items()}, arch


# --- the file's own rescaling, as its code computes it (float32) -------------------------------------------------
def reference_t(state: dict[str, torch.Tensor], arch: SLLArchitecture, source: str, weight_name: str) -> torch.Tensor:
    """The layer's ``t`` (its code's per-unit factor divided by 2, an exact division) evaluated in float32 in its
    code's order of operations; ``CplCertError`` where it is not finite (a zero row: that code divides by zero)."""
    w, q = state[f"{source}.{weight_name}"], state[f"{source}.q"]
    conv = w.dim() == 4
    if arch.version == "current" and conv:
        cross = F.conv2d(w, w, padding=w.shape[-1] - 1).abs()
        sums = (torch.exp(-q).view(-1, 1, 1, 1) * cross * torch.exp(q).view(-1, 1, 1, 1)).sum(dim=(1, 2, 3))
        t = torch.where(sums == 0, torch.zeros_like(sums), 1.0 / sums)
    elif arch.version == "current":
        sums = torch.einsum("i,ik,kj,j -> ij", torch.exp(-q), w, w.t(), torch.exp(q)).abs().sum(dim=1)
        t = torch.where(sums == 0, torch.zeros_like(sums), 1.0 / sums)
    elif conv:
        q_abs = q.abs()
        t = (2.0 / ((q_abs[None, :, None, None] * F.conv2d(w, w, padding=w.shape[-1] - 1)).abs().sum(dim=(1, 2, 3)) / q_abs)) / 2.0
    else:
        q_abs = q.abs()
        t = (2.0 / ((1.0 / (q_abs + OLD_EPSILON))[:, None] * w @ w.t() * q_abs[None, :]).abs().sum(dim=1)) / 2.0
    if not bool(torch.isfinite(t).all()):
        raise CplCertError(f"{source}'s rescaling is infinite or undefined (a zero row of {weight_name}, or q = 0): its forward is not defined")
    return t


def q_parameter(state: dict[str, torch.Tensor], arch: SLLArchitecture, source: str, conv: bool) -> torch.Tensor:
    """cpl-cert's ``q`` (the log of SLL's q) giving the file's rescaling in exact arithmetic: the current conv
    layer's q cancels (0 here); the earlier version uses ``|q|`` (logged, a zero kept at the smallest normal)."""
    q = state[f"{source}.q"]
    if arch.version == "current":
        return torch.zeros_like(q) if conv else q.clone()
    return q.abs().clamp_min(torch.finfo(torch.float32).tiny).log()


# --- conversion -------------------------------------------------------------------------------------------------
def sll_model_config(arch: SLLArchitecture, dataset: str) -> ModelConfig:
    """The cpl-cert architecture computing the SLL network's function."""
    return ModelConfig(
        input_shape=(3, arch.size, arch.size), num_classes=arch.num_classes, channels=arch.w, conv_depth=arch.n_conv,
        dense_depth=arch.n_dense, conv_inner=max(arch.conv_inner, 1), dense_inner=max(arch.dense_inner, 1), pool=4,
        head="lln" if arch.lln else "truncation", layer="sll", mean=SLL_DATA[dataset].mean, std=None,
    )


def build_sll_model(state: dict[str, torch.Tensor], arch: SLLArchitecture, dataset: str) -> tuple[CPLNet, list[torch.Tensor]]:
    """A cpl-cert network holding the file's tensors, each layer frozen at the file's own rescaling (returned too)."""
    model = CPLNet(sll_model_config(arch, dataset))
    tensors = model.state_dict()
    ts = []
    for name, source, weight_name in arch.layers():
        conv = name.startswith("convs")
        tensors[f"{name}.weight"] = state[f"{source}.{weight_name}"]
        tensors[f"{name}.bias"] = state[f"{source}.bias"].flatten()
        tensors[f"{name}.q"] = q_parameter(state, arch, source, conv)
        ts.append(reference_t(state, arch, source, weight_name))
    if arch.lln:
        tensors["head.weight"] = state[f"{arch.head_prefix()}.weight"]
        tensors["head.bias"] = state[f"{arch.head_prefix()}.bias"]
    model.load_state_dict(tensors)
    for (_, layer), t in zip(cpl_layers(model), ts, strict=True):
        layer.set_frozen_t(t)
    return model.eval(), ts


def _layer_rows(bounds: LipschitzBounds) -> list[tuple[float, float]]:
    """(certified ||A||, layer bound) of each SLL row."""
    return [(row.sigma_upper, row.bound) for row in bounds.layers if row.kind.startswith("sll") and row.sigma_upper is not None]


def import_sll(path: str | Path, dataset: str, steps: StepsMode = "certified") -> ImportedModel:
    """Read an SLL-code checkpoint (either version) and convert it; ``steps`` picks the written rescaling.

    ``reference`` keeps the file's own rescaling (its function; the certified bound reported, above 1 where it
    is); ``certified`` re-freezes with ``cpl_cert.freeze``. Both bounds are in ``provenance``.
    """
    check_steps_mode(steps)
    file = Path(path)
    state, arch = read_sll(file, dataset)
    model, ref_ts = build_sll_model(state, arch, dataset)
    for _, layer in cpl_layers(model):  # the report's vector for ||A u|| (the function does not depend on it)
        refresh_vector(layer, 100, operators=scaled_operators(layer, torch.float32))
    ref_bounds = lipschitz_bounds(model)
    if steps == "certified":
        freeze(model)
    bounds = ref_bounds if steps == "reference" else lipschitz_bounds(model)
    ratios = [_ratio_range(layer.t, t) for (_, layer), t in zip(cpl_layers(model), ref_ts, strict=True)]
    return ImportedModel(model, arch, _dataset_meta(arch, dataset), _provenance(file, arch, steps, ref_bounds, bounds, ratios))


def _ratio_range(new: torch.Tensor, old: torch.Tensor) -> tuple[float, float]:
    """Smallest and largest ``new / old`` over the units where ``old > 0``."""
    mask = old > 0
    ratio = new.double()[mask] / old.double()[mask]
    return (float(ratio.min()), float(ratio.max())) if ratio.numel() else (1.0, 1.0)


def _provenance(file: Path, arch: SLLArchitecture, steps: str, ref: LipschitzBounds, written: LipschitzBounds,
                ratios: list[tuple[float, float]]) -> dict[str, object]:
    ref_rows, new_rows = _layer_rows(ref), _layer_rows(written)
    return {
        "source": file.name,
        "sha256": file_sha256(file),
        "format": f"SLL code (araujoalexandre/Lipschitz-SLL-Networks) training checkpoint, {arch.version} layer version",
        "architecture": dataclasses.asdict(arch),
        "steps": steps,
        "layers": [name for name, _, _ in arch.layers()],
        "reference_scaled_sigmas": [a for a, _ in ref_rows],
        "reference_layer_bounds": [b for _, b in ref_rows],
        "reference_assumed_body_bound": 1.0,
        "reference_body_bound": ref.body_upper,
        "reference_network_bound": ref.upper,
        "written_scaled_sigmas": [a for a, _ in new_rows],
        "written_layer_bounds": [b for _, b in new_rows],
        "written_t_ratios": [list(r) for r in ratios],
        "written_body_bound": written.body_upper,
        "written_network_bound": written.upper,
    }


def _dataset_meta(arch: SLLArchitecture, dataset: str) -> dict[str, object]:
    classes = list(SPECS[dataset].classes) if dataset in SPECS else [str(i) for i in range(arch.num_classes)]
    return {
        "name": dataset, "input_shape": [3, arch.size, arch.size], "num_classes": arch.num_classes, "classes": classes,
        "mean": list(SLL_DATA[dataset].mean), "std": [1.0, 1.0, 1.0],
    }

