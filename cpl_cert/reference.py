"""Checkpoints of the CPL paper's reference code: read them safely, infer the architecture, convert.

The reference code (Meunier et al. 2022) saves ``torch.save(model.state_dict())`` of
``nn.DataParallel(NormalizedModel(ConvexPotentialLayerNetwork(...)))``, so every key starts with
``module.model.``; the files are read with ``torch.load(weights_only=True)`` only (no code runs).
Layout, with ``C`` channels and ``F = 64 C`` features (the input is fixed at 3x32x32):

- conv layer ``i``: ``stable_block.{i}.kernel`` (inner, C, 3, 3), ``.bias``, ``.eval_sv_max`` (1,),
  ``.pm.u`` (1, C, 32, 32); ``stable_block.{depth}`` is the block-sum pool (no tensors);
- dense layer ``j`` (1-based, index 0 is Flatten): ``layers_linear.{j}.weights`` (inner, F),
  ``.bias``, ``.alpha`` (1,) (unused by the forward), ``.eval_sv_max``, ``.pm.u`` (1, F);
- LLN head: ``last_last.weight`` (K, F) and ``.bias``; the truncation head has no tensors;
- the conv and dense tensors again under ``base.1.{i}`` and ``base.2.{j}`` (the same modules).

Its layers use the step ``2 / (sigma^2 + 1e-4)`` with ``sigma`` = ``eval_sv_max`` when set, else a
100-iteration power-iteration estimate from ``pm.u``. Power iteration converges from below, so
those steps can make layers slightly more than 1-Lipschitz: ``import_reference`` reports the
certified bound they really give and, by default, re-freezes with cpl-cert's certified steps.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from .data import SPECS
from .errors import CplCertError
from .files import file_sha256
from .freezing import freeze
from .layers import STEP_EPSILON, CPLConv2d, CPLLinear
from .lipschitz import lipschitz_bounds
from .models import CPLNet, ModelConfig, cpl_layers
from .spectral import layer_operators, power_iteration

StepsMode = Literal["certified", "reference"]
STEPS_MODES = ("certified", "reference")
REFERENCE_INPUT_SHAPE = (3, 32, 32)
REFERENCE_POOL = 4
EVAL_ITERS = 100
"""Power iterations the reference code runs once at evaluation when ``eval_sv_max`` is not set."""

PREFIXES = ("module.model.", "model.", "")
"""Key prefixes accepted: the reference's own (DataParallel + NormalizedModel), and the state_dict
of the inner modules re-saved without those wrappers."""


def check_steps_mode(steps: str) -> None:
    """Refuse, with one sentence, a steps mode that is not ``certified`` or ``reference`` (before any file is read)."""
    if steps not in STEPS_MODES:
        raise CplCertError(f"--steps must be certified or reference, got {steps!r}")


CONV_TENSORS = ("kernel", "bias", "eval_sv_max", "pm.u")
DENSE_TENSORS = ("weights", "bias", "alpha", "eval_sv_max", "pm.u")


@dataclass(frozen=True)
class ReferenceData:
    """The input normalisation the reference code applies (not stored in its files)."""

    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


# The reference trainer's constants: CIFAR-10 statistics to full precision, CIFAR-100 to 4 digits.
REFERENCE_DATA = {
    "cifar10": ReferenceData(
        10, (0.4913997551666284, 0.48215855929893703, 0.4465309133731618), (0.24703225141799082, 0.24348516474564, 0.26158783926049628)
    ),
    "cifar100": ReferenceData(100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass(frozen=True)
class ReferenceArchitecture:
    """The reference network's hyper-parameters, named as its command line names them."""

    depth: int
    num_channels: int
    conv_size: int
    depth_linear: int
    n_features: int
    lln: bool
    num_classes: int

    @property
    def features(self) -> int:
        """Width of the dense part: ``num_channels`` x 8 x 8."""
        return self.num_channels * (REFERENCE_INPUT_SHAPE[1] // REFERENCE_POOL) * (REFERENCE_INPUT_SHAPE[2] // REFERENCE_POOL)


@dataclass
class ImportedModel:
    """A converted reference network: the frozen cpl-cert model and what the checkpoint should record.
    ``architecture`` is a ``ReferenceArchitecture`` (CPL code) or a ``cpl_cert.sll_reference.SLLArchitecture``."""

    model: CPLNet
    architecture: Any
    dataset: dict[str, Any]
    provenance: dict[str, Any]


# --- reading --------------------------------------------------------------------------------------


def _unpickling_message(path: Path, exc: Exception) -> str:
    found = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
    what = f" (it refers to {found.group(1)})" if found else ""
    return (
        f"{path} holds Python objects, not only tensors{what}: cpl-cert reads it with torch.load(weights_only=True) "
        "and never runs code from a file; on a machine that trusts the file, re-save the weights with "
        "torch.save(model.state_dict(), PATH)"
    )


def _is_safetensors(path: Path) -> bool:
    """A safetensors header: an 8-byte little-endian length that fits the file, then a JSON object."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size - 8 and head[8:] == b"{"


def read_torch_file(path: str | Path, what: str = "the reference code") -> object:
    """The object a ``torch.save`` file holds, read with ``weights_only=True`` on the CPU (tensors, dicts, lists,
    numbers and strings only: no code runs); one sentence on failure. ``what`` names the code that wrote it."""
    file = Path(path)
    if not file.exists():
        raise CplCertError(f"{file} does not exist")
    if file.is_dir():
        raise CplCertError(f"{file} is a folder, not a torch.save file")
    if _is_safetensors(file):  # torch.load would read it, but it is no reference-code file
        raise CplCertError(f"{file} is a safetensors file, not a torch.save file of {what} (a cpl-cert checkpoint needs no import)")
    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc) and "GLOBAL" in str(exc):
            raise CplCertError(_unpickling_message(file, exc)) from None
        raise CplCertError(f"{file} is not a torch.save file of tensors (it cannot be read as one)") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, zipfile.BadZipFile, UnicodeDecodeError, AttributeError):
        raise CplCertError(f"{file} is not a torch.save file (empty, truncated or another format)") from None


def check_state_dict(state: object, file: Path) -> dict[str, torch.Tensor]:
    """``state`` as a dict of named tensors, or one sentence saying what it is instead."""
    if not isinstance(state, dict):
        raise CplCertError(f"{file} holds a {type(state).__name__}, not a state_dict (a dict of named tensors)")
    if "model_state_dict" in state:
        raise CplCertError(f"{file} is a training checkpoint (model_state_dict and more) as the SLL code saves, not a CPL state_dict; use --from sll")
    bad = [key for key, value in state.items() if not (isinstance(key, str) and isinstance(value, torch.Tensor))]
    if bad:
        raise CplCertError(f"{file} is not a state_dict: the entry {bad[0]!r} is not a named tensor")
    return dict(state)


def load_reference_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``torch.save`` file, read with ``weights_only=True`` on the CPU; one sentence on failure."""
    return check_state_dict(read_torch_file(path), Path(path))


def _strip_prefix(state: dict[str, torch.Tensor], path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """The wrappers' key prefix (the longest of ``PREFIXES`` that every key has) and the tensors without it."""
    if not state:
        raise CplCertError(f"{path} holds an empty state_dict")
    prefix = next(p for p in PREFIXES if all(key.startswith(p) for key in state))  # "" always matches
    return prefix, {key[len(prefix):]: value for key, value in state.items()}


# --- architecture ---------------------------------------------------------------------------------


def _count(state: dict[str, torch.Tensor], template: str, start: int) -> int:
    """How many consecutive indices ``start, start + 1, ...`` have the key ``template.format(index)``."""
    index = start
    while template.format(index) in state:
        index += 1
    return index - start


def infer_architecture(state: dict[str, torch.Tensor], num_classes: int, lln: bool, path: Path, prefix: str = "") -> ReferenceArchitecture:
    """Depth, channels and widths from the tensor shapes (keys without ``prefix``, which messages add back)."""
    depth = _count(state, "stable_block.{}.kernel", 0)
    depth_linear = _count(state, "layers_linear.{}.weights", 1)
    if depth == 0 and depth_linear == 0 and "last_last.weight" not in state:
        first = next(iter(state))
        raise CplCertError(
            f"{path} is not a reference CPL state_dict: it has no {prefix}stable_block.0.kernel, {prefix}layers_linear.1.weights "
            f"or {prefix}last_last.weight tensor (its first tensor is {prefix}{first})"
        )
    conv_size = n_features = 0
    if depth:
        kernel = state["stable_block.0.kernel"]
        if kernel.dim() != 4:
            raise CplCertError(f"{path}: {prefix}stable_block.0.kernel has shape {tuple(kernel.shape)}, not (inner, channels, 3, 3)")
        conv_size, channels = int(kernel.shape[0]), int(kernel.shape[1])
    else:
        width_source = "layers_linear.1.weights" if depth_linear else "last_last.weight"
        width = int(state[width_source].shape[-1])
        if width % 64:
            raise CplCertError(f"{path}: {prefix}{width_source} has {width} input features, not a multiple of 64 (channels x 8 x 8)")
        channels = width // 64
    if depth_linear:
        n_features = int(state["layers_linear.1.weights"].shape[0])
    return ReferenceArchitecture(depth, channels, conv_size, depth_linear, n_features, lln, num_classes)


def expected_shapes(arch: ReferenceArchitecture) -> dict[str, tuple[int, ...]]:
    """Every key (without prefix) of the reference network's state_dict and its shape."""
    c, f = arch.num_channels, arch.features
    shapes: dict[str, tuple[int, ...]] = {}
    conv = {"kernel": (arch.conv_size, c, 3, 3), "bias": (arch.conv_size,), "eval_sv_max": (1,), "pm.u": (1, c, 32, 32)}
    dense = {"weights": (arch.n_features, f), "bias": (arch.n_features,), "alpha": (1,), "eval_sv_max": (1,), "pm.u": (1, f)}
    for i in range(arch.depth):
        for name, shape in conv.items():
            shapes[f"stable_block.{i}.{name}"] = shapes[f"base.1.{i}.{name}"] = shape
    for j in range(1, arch.depth_linear + 1):
        for name, shape in dense.items():
            shapes[f"layers_linear.{j}.{name}"] = shapes[f"base.2.{j}.{name}"] = shape
    if arch.lln:
        shapes["last_last.weight"] = (arch.num_classes, f)
        shapes["last_last.bias"] = (arch.num_classes,)
    return shapes


def check_tensors(state: dict[str, torch.Tensor], arch: ReferenceArchitecture, path: Path, prefix: str = "") -> None:
    """Every key present, none extra, every shape right, every value finite, both copies equal."""
    expected = expected_shapes(arch)
    p = prefix
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if "last_last.weight" in unexpected and not arch.lln:
        raise CplCertError(f"{path} has an LLN head ({p}last_last.weight); pass --lln")
    if "last_last.weight" in missing:
        raise CplCertError(f"{path} has no LLN head (no {p}last_last.weight); drop --lln")
    if missing:
        raise CplCertError(f"{path} lacks the tensor {p}{missing[0]} ({len(missing)} missing) that a reference CPL network of its shape has")
    if unexpected:
        raise CplCertError(f"{path} has a tensor {p}{unexpected[0]} ({len(unexpected)} unexpected) that a reference CPL network does not have")
    if arch.lln and state["last_last.weight"].shape[0] != arch.num_classes:
        rows = state["last_last.weight"].shape[0]
        raise CplCertError(f"{path}: the LLN head predicts {rows} classes but the dataset has {arch.num_classes}; check --dataset")
    for key, shape in expected.items():
        tensor = state[key]
        if tuple(tensor.shape) != shape:
            raise CplCertError(f"{path}: tensor {p}{key} has shape {tuple(tensor.shape)}, a reference CPL network of its shape needs {shape}")
        if not tensor.is_floating_point():
            raise CplCertError(f"{path}: tensor {p}{key} holds {tensor.dtype} values, not floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise CplCertError(f"{path}: tensor {p}{key} contains NaN or infinite values")
    for key in expected:
        twin = _twin(key)
        if twin is not None and not torch.equal(state[key], state[twin]):
            raise CplCertError(f"{path}: {p}{key} and {p}{twin} should be the same tensor but differ")


def _twin(key: str) -> str | None:
    """The ``base.…`` copy of a conv or dense key (``None`` for other keys and for the copies themselves)."""
    for block, index in (("stable_block.", "base.1."), ("layers_linear.", "base.2.")):
        if key.startswith(block):
            return index + key[len(block):]
    return None


def read_reference(path: str | Path, dataset: str, lln: bool) -> tuple[dict[str, torch.Tensor], ReferenceArchitecture]:
    """The checked tensors (keys without prefix, float32) and the architecture of a reference file."""
    file = Path(path)
    if dataset not in REFERENCE_DATA:
        raise CplCertError(f"the reference code trains on cifar10 or cifar100, not {dataset!r}")
    prefix, state = _strip_prefix(load_reference_state_dict(file), file)
    arch = infer_architecture(state, REFERENCE_DATA[dataset].num_classes, lln, file, prefix)
    check_tensors(state, arch, file, prefix)
    if arch.num_channels < REFERENCE_INPUT_SHAPE[0]:
        raise CplCertError(f"{file} has {arch.num_channels} channels, fewer than the 3 input channels a reference CPL network pads from")
    return {key: value.float() for key, value in state.items()}, arch


# --- the reference's steps ------------------------------------------------------------------------


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / (x.square().sum().sqrt() + 1e-12)


@torch.no_grad()
def reference_sigma(weight: torch.Tensor, u: torch.Tensor, iters: int = EVAL_ITERS) -> float:
    """The reference code's evaluation estimate of ``||W||_2``: ``iters`` power iterations from ``u``
    in float32, then ``<W u, v>`` with ``v`` the last normalised ``W u`` (a lower estimate)."""
    if weight.dim() == 4:
        def apply_w(x):
            return F.conv2d(x, weight, padding=1)
        def apply_wt(y):
            return F.conv_transpose2d(y, weight, padding=1)
    else:
        def apply_w(x):
            return F.linear(x, weight)
        def apply_wt(y):
            return F.linear(y, weight.t())
    u = u.float()
    v = _unit(apply_w(u))
    for _ in range(iters):
        v = _unit(apply_w(u))
        u = _unit(apply_wt(v))
    return float((apply_w(u) * v).sum())


def reference_step(sigma: float) -> float:
    """``2 / (sigma^2 + 1e-4)`` evaluated in float32, as the reference's float32 buffer computes it."""
    s = torch.tensor(sigma, dtype=torch.float32)
    return float(2.0 / (s * s + STEP_EPSILON))


def reference_sigmas(state: dict[str, torch.Tensor], arch: ReferenceArchitecture) -> list[tuple[float, str]]:
    """Per CPL layer in forward order: the sigma the reference evaluates with and where it comes from."""
    layers = [(f"stable_block.{i}", "kernel") for i in range(arch.depth)]
    layers += [(f"layers_linear.{j}", "weights") for j in range(1, arch.depth_linear + 1)]
    sigmas = []
    for prefix, weight_name in layers:
        cached = float(state[f"{prefix}.eval_sv_max"][0])
        if cached > 0:
            sigmas.append((cached, "eval_sv_max"))
        else:
            sigmas.append((reference_sigma(state[f"{prefix}.{weight_name}"], state[f"{prefix}.pm.u"]), f"power-iteration-{EVAL_ITERS}"))
    return sigmas


# --- conversion -----------------------------------------------------------------------------------


def model_config(arch: ReferenceArchitecture, dataset: str, norm_input: bool) -> ModelConfig:
    """The cpl-cert architecture computing the reference network's function."""
    data = REFERENCE_DATA[dataset]
    return ModelConfig(
        input_shape=REFERENCE_INPUT_SHAPE,
        num_classes=arch.num_classes,
        channels=arch.num_channels,
        conv_depth=arch.depth,
        dense_depth=arch.depth_linear,
        conv_inner=max(arch.conv_size, 1),
        dense_inner=max(arch.n_features, 1),
        pool=REFERENCE_POOL,
        head="lln" if arch.lln else "truncation",
        mean=data.mean,
        std=data.std if norm_input else None,
    )


def _start_vector(u: torch.Tensor) -> torch.Tensor:
    """The stored power-iteration vector, or a constant unit vector if it is zero."""
    norm = u.norm()
    return u / norm if norm > 0 else torch.full_like(u, 1.0 / u.numel() ** 0.5)


def converted_state_dict(state: dict[str, torch.Tensor], arch: ReferenceArchitecture, steps: list[float]) -> dict[str, torch.Tensor]:
    """cpl-cert tensor names for the reference tensors, with each CPL layer's step."""
    out: dict[str, torch.Tensor] = {}
    layers = [(f"convs.{i}", f"stable_block.{i}", "kernel") for i in range(arch.depth)]
    layers += [(f"dense.{j - 1}", f"layers_linear.{j}", "weights") for j in range(1, arch.depth_linear + 1)]
    for (name, source, weight_name), step in zip(layers, steps, strict=True):
        out[f"{name}.weight"] = state[f"{source}.{weight_name}"]
        out[f"{name}.bias"] = state[f"{source}.bias"]
        out[f"{name}.u"] = _start_vector(state[f"{source}.pm.u"])
        out[f"{name}.step"] = torch.tensor(step, dtype=torch.float32)
    if arch.lln:
        out["head.weight"] = state["last_last.weight"]
        out["head.bias"] = state["last_last.bias"]
    return out


@torch.no_grad()
def converge_vector(layer: CPLConv2d | CPLLinear) -> None:
    """Run the layer's power iteration to convergence without touching its step, so that the stored
    vector (shown by ``cpl-cert lipschitz``) estimates ``||W||_2`` well; the function stays the same."""
    apply_w, apply_wt = layer_operators(layer, torch.float32)
    apply_w64 = layer_operators(layer, torch.float64)[0]

    def measure(vec: torch.Tensor) -> float:  # sigma of the vector in float64, as freeze measures it
        vec = vec.double()
        return float(apply_w64(vec / vec.norm()).norm())

    _, u = power_iteration(apply_w, apply_wt, layer.u.float(), 2000, 1e-7, check_every=10, measure=measure)
    layer.u.copy_(u)


def build_reference_model(
    state: dict[str, torch.Tensor], arch: ReferenceArchitecture, dataset: str, norm_input: bool, steps: list[float]
) -> CPLNet:
    """A cpl-cert network holding the reference tensors, each CPL layer frozen at ``steps``."""
    if not all(0 < step < float("inf") for step in steps):
        raise CplCertError("a reference step 2 / (sigma^2 + 1e-4) is zero or not finite: the weights are far too large")
    model = CPLNet(model_config(arch, dataset, norm_input))
    tensors = model.state_dict()  # keeps the input normalisation buffers the config set
    tensors.update(converted_state_dict(state, arch, steps))
    model.load_state_dict(tensors)
    for (_, layer), step in zip(cpl_layers(model), steps, strict=True):
        assert isinstance(layer, (CPLConv2d, CPLLinear))
        layer.set_frozen_step(step)
    return model.eval()


def import_reference(
    path: str | Path, dataset: str, norm_input: bool = False, lln: bool = False, steps: StepsMode = "certified"
) -> ImportedModel:
    """Read a reference-code checkpoint and convert it; ``steps`` picks the written model's steps.

    ``reference`` keeps the reference's own steps (its function exactly; certified bound reported, in
    general above 1); ``certified`` re-freezes with ``cpl_cert.freeze`` (provably 1-Lipschitz layers).
    Both bounds are in ``provenance``.
    """
    check_steps_mode(steps)
    file = Path(path)
    state, arch = read_reference(file, dataset, lln)
    sigmas = reference_sigmas(state, arch)
    ref_steps = [reference_step(sigma) for sigma, _ in sigmas]
    model = build_reference_model(state, arch, dataset, norm_input, ref_steps)
    if steps == "certified":
        ref_bounds = lipschitz_bounds(model)
        freeze(model)
    else:
        for _, layer in cpl_layers(model):
            converge_vector(layer)
        ref_bounds = lipschitz_bounds(model)
    bounds = ref_bounds if steps == "reference" else lipschitz_bounds(model)
    new_steps = [float(layer.step) for _, layer in cpl_layers(model)]
    data = REFERENCE_DATA[dataset]
    spec = SPECS[dataset]
    provenance = {
        "source": file.name,
        "sha256": file_sha256(file),
        "format": "Convex-Potential-Layer reference code state_dict (MILES-PSL)",
        "architecture": dataclasses.asdict(arch),
        "norm_input": norm_input,
        "steps": steps,
        "reference_sigmas": [sigma for sigma, _ in sigmas],
        "reference_sigma_sources": [source for _, source in sigmas],
        "reference_steps": ref_steps,
        "reference_assumed_body_bound": 1.0 / min(data.std) if norm_input else 1.0,
        "reference_steps_body_bound": ref_bounds.body_upper,
        "reference_steps_network_bound": ref_bounds.upper,
        "reference_steps_layer_bounds": [row.bound for row in ref_bounds.layers if row.step is not None],
        "written_steps": new_steps,
        "written_body_bound": bounds.body_upper,
        "written_network_bound": bounds.upper,
    }
    dataset_meta = {
        "name": dataset,
        "input_shape": list(REFERENCE_INPUT_SHAPE),
        "num_classes": arch.num_classes,
        "classes": list(spec.classes),
        "mean": list(data.mean),
        "std": list(data.std),
    }
    return ImportedModel(model, arch, dataset_meta, provenance)
