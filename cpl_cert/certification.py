"""Certified radii and accuracies of a data set: one float32 forward pass per image, batched on the device.

For logits ``f`` and a certified Lipschitz constant ``L_ij`` of each difference ``f_i - f_j``, the
prediction ``t`` cannot change within ``radius = min_{j != t} (f_t - f_j) / L_tj``. With a truncation
head ``L_tj = sqrt(2) L_body`` (the paper's ``margin / (sqrt(2) L)``); with an LLN head
``L_tj = ||w_t - w_j|| L_body``. Every radius carries a rigorous allowance for rounding
(``cpl_cert.radii``): the first pass runs the convolutions in float32 and the dense layers in float64; the
points it leaves undecided are evaluated in float64 throughout. See docs/certify.md and docs/math.md.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .data import ImageDataset
from .device import resolve_device
from .eps import EpsValue, parse_eps
from .errors import CplCertError
from .lipschitz import LipschitzBounds, lipschitz_bounds
from .models import CPLNet, float64_copy, weights_key
from .numerics import strict_math
from .passes import accumulated_logits
from .progress import OnProgress, no_progress
from .radii import UNKNOWN, Answers, as_points, fast_pass, float32_prediction, float64_pass
from .rounding import ErrorModel, error_model
from .shards import Shards
from .validate import validate_model


@dataclass
class CertifyResult:
    """Per-sample results (CPU tensors) and the summary of one certification run.

    Three senses of "certified" (docs/certify.md), each about a named network:

    * ``radii_exact``: the exact function of the stored weights (what papers report; the counts at each
      eps are those of an exact evaluation); ``predictions`` is its class (-1 where no class is certain:
      a tie, or non-finite logits);
    * ``radii_float32``: cpl-cert's float32 network (float32 activations, every dot product accumulated in
      float64, as ``cpl_cert.predict`` and ``cpl-cert predict`` run it); ``predictions_float32`` its class;
    * ``radii_any``: every float32 runtime that rounds each operation correctly and sums dot products in
      any order (PyTorch's ``model(x)``, ONNX Runtime); ``predictions_any`` is the class all of them
      provably compute (-1 where that is not proven). Often 0 on deep networks, whose worst-case rounding
      bound exceeds their margins.

    ``radii`` holds for the exact function and cpl-cert's float32 network at once.
    """

    labels: torch.Tensor
    predictions: torch.Tensor
    predictions_float32: torch.Tensor
    predictions_any: torch.Tensor
    margins: torch.Tensor
    radii: torch.Tensor
    radii_exact: torch.Tensor
    radii_float32: torch.Tensor
    radii_any: torch.Tensor
    eps: list[EpsValue]
    bounds: LipschitzBounds
    device: str
    seconds: float
    rechecked: int = 0
    processes: int = 1
    """The processes that computed the result (torchrun: one per device; equal results for any number)."""
    undecided: int = 0
    nonfinite: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    @property
    def correct(self) -> torch.Tensor:
        return self.predictions == self.labels

    @property
    def correct_float32(self) -> torch.Tensor:
        return self.predictions_float32 == self.labels

    @property
    def correct_any(self) -> torch.Tensor:
        return self.predictions_any == self.labels

    @property
    def clean_accuracy(self) -> float:
        return fraction(self.correct)

    @property
    def clean_accuracy_float32(self) -> float:
        return fraction(self.correct_float32)

    @property
    def clean_accuracy_any(self) -> float:
        """Fraction of points every correctly rounded float32 runtime provably classifies correctly."""
        return fraction(self.correct_any)

    def certified_accuracy(self, eps: float) -> float:
        """Fraction of points the exact function classifies correctly with a radius above ``eps``."""
        return fraction(self.correct & (self.radii_exact > eps))

    def certified_accuracy_float32(self, eps: float) -> float:
        """The same for cpl-cert's float32 network (margins deflated by its rounding bound)."""
        return fraction(self.correct_float32 & (self.radii_float32 > eps))

    def certified_accuracy_any(self, eps: float) -> float:
        """The same for every correctly rounded float32 runtime at once."""
        return fraction(self.correct_any & (self.radii_any > eps))

    def median_radius(self, sense: str = "exact") -> float | None:
        """Median radius in ``sense`` (``exact``, ``float32`` or ``any``) of the points correctly classified in that
        sense (``None`` when there are none)."""
        correct = {"exact": self.correct, "float32": self.correct_float32, "any": self.correct_any}[sense]
        radii = getattr(self, f"radii_{sense}")[correct]
        return float(radii.median()) if radii.numel() else None

    @property
    def certified(self) -> list[dict[str, Any]]:
        return [
            {"eps": e.value, "label": e.label, "accuracy": self.certified_accuracy(e.value),
             "accuracy_float32": self.certified_accuracy_float32(e.value), "accuracy_any": self.certified_accuracy_any(e.value)}
            for e in self.eps
        ]

    @property
    def images_per_second(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("inf")


def fraction(mask: torch.Tensor) -> float:
    """The fraction of true entries (0 for none)."""
    return float(mask.double().mean()) if mask.numel() else 0.0


def _as_tensors(data: ImageDataset | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, ImageDataset):
        return data.images, data.labels
    if isinstance(data, (tuple, list)) and len(data) == 2:
        images, labels = data
        images = torch.as_tensor(images)
        if labels is None:  # no labels: every class is decided, no accuracy is meaningful
            return images, torch.full((images.shape[0] if images.dim() else 0,), -1, dtype=torch.long)
        return images, torch.as_tensor(labels)
    raise CplCertError("certify needs an ImageDataset or a pair (images, labels or None)")


def _check_images(images: torch.Tensor, labels: torch.Tensor, input_shape: tuple[int, ...]) -> None:
    if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise CplCertError(f"images must be (N, C, H, W) with one label each, got {tuple(images.shape)} and {tuple(labels.shape)}")
    if tuple(images.shape[1:]) != tuple(input_shape):
        raise CplCertError(f"the images have shape {tuple(images.shape[1:])} but the model expects {tuple(input_shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise CplCertError(f"images must be uint8 pixels (0-255) or floats in [0, 1], not {images.dtype}")


# --- the whole run -------------------------------------------------------------------------------------------
def certify(
    model: CPLNet,
    data: ImageDataset | tuple[torch.Tensor, torch.Tensor],
    eps: str | Sequence[str | float | EpsValue] | float = (0.1, 0.25, 0.5, 1.0),
    device: str | torch.device | None = "auto",
    batch_size: int = 1024,
    bounds: LipschitzBounds | None = None,
    on_progress: OnProgress | None = None,
    tight_radii: bool = False,
    shards: Shards | None = None,
) -> CertifyResult:
    """Certify every point of ``data``: predictions, margins, radii in the three senses, and accuracies.

    The model is moved to ``device`` (in place, as ``nn.Module.to`` does); the data go there once;
    nothing syncs with the host per batch. Points whose first evaluation cannot decide the exact function's answer at some eps
    (or its class), or could be certified at an eps by a tighter evaluation of cpl-cert's float32 network,
    are evaluated again in float64 before they count (docs/certify.md). ``tight_radii`` evaluates every
    point in float64, so that each reported exact radius is within about 1e-9 of its exact value (for a
    per-sample export; the counts do not need it). ``on_progress(stage, done, total)``
    follows every stage in points: ``"float32"`` (all points), then ``"float64"`` (the points re-evaluated).

    ``shards`` (``cpl_cert.shards.join``, under torchrun) splits every pass over the job's processes,
    batch k on process k mod N, each on its own device (``shards.device`` replaces ``device``); every
    process gets the whole result, equal to a single-process run's.
    """
    with torch.inference_mode(), strict_math():
        result = _certify(model, data, eps, device, batch_size, bounds, on_progress, tight_radii, shards or Shards())
    # Inference tensors cannot enter autograd (an attack on the certified points would fail): clone out.
    for name in ("labels", "predictions", "predictions_float32", "predictions_any", "margins", "radii", "radii_exact",
                 "radii_float32", "radii_any"):
        setattr(result, name, getattr(result, name).clone())
    return result


def _certify(
    model: CPLNet,
    data: ImageDataset | tuple[torch.Tensor, torch.Tensor],
    eps: str | Sequence[str | float | EpsValue] | float,
    device: str | torch.device | None,
    batch_size: int,
    bounds: LipschitzBounds | None,
    on_progress: OnProgress | None,
    tight_radii: bool,
    shards: Shards,
) -> CertifyResult:
    if batch_size < 1:
        raise CplCertError(f"--batch-size must be positive, got {batch_size}")
    eps_values = parse_eps(eps)
    dev = shards.device if shards.enabled else resolve_device(device)
    model = model.to(dev).eval()
    images, labels = _as_tensors(data)
    _check_images(images, labels, model.config.input_shape)
    bounds, constants = certificate_constants(model, bounds)
    if shards.enabled:
        shards.agree(_fingerprint(model, images, labels, eps_values, batch_size, tight_radii), "checkpoint, data and options")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    run = _Run(model, constants, images.to(dev, non_blocking=True), labels.to(dev).long(),
               torch.tensor([e.value for e in eps_values], dtype=torch.float64, device=dev), tight_radii, on_progress or no_progress)
    answers = _first_pass(run, batch_size, shards)
    _float64_pass(run, answers, batch_size, shards)
    _run_float32_network(run, answers, batch_size, shards)
    result = _result(answers, run.labels, eps_values, bounds, str(dev))
    result.processes = shards.world_size
    result.rechecked = int(answers.float64.sum())
    result.undecided = int(_undecided(run, answers).sum())
    result.nonfinite = int((~answers.finite).sum())
    result.seconds = time.perf_counter() - start
    return result


@dataclass
class _Run:
    """One certification run: the model, its float64 copy (made on first need), its rounding constants,
    the data on the device and what must be decided about them."""

    model: CPLNet
    constants: ErrorModel
    images: torch.Tensor
    labels: torch.Tensor
    eps: torch.Tensor
    tight_radii: bool
    report: OnProgress
    model64: CPLNet | None = None

    def copy64(self) -> CPLNet:
        if self.model64 is None:
            self.model64 = float64_copy(self.model)
        return self.model64


FLOAT64_FIRST = 0.5
"""When the first batch's float32 pass leaves more than this fraction of its points undecided (a deep
network whose worst-case float32 rounding bound exceeds its margins), the other batches go straight to
float64: evaluating them twice would cost more."""


def _first_pass(run: _Run, batch_size: int, shards: Shards) -> Answers:
    """The fast pass (float32 convolutions, float64 dense layers) over all points, batch by batch; or
    float64 from the second batch on when the fast pass decides too little (``FLOAT64_FIRST``).

    Over N processes the first round runs the fast pass on batches 0 to N-1; the decision is taken on
    batch 0's answers, which every process then holds, and batches 1 to N-1 are evaluated again in
    float64 when it says so: each batch's answers are those of a single-process run.
    """
    total = run.images.shape[0]
    batches = [slice(begin, begin + batch_size) for begin in range(0, total, batch_size)]
    run.report("float32", 0, total)

    def done(count: int) -> None:
        run.report("float32", min(count * batch_size, total), total)

    def fast(part: slice) -> Answers:
        return fast_pass(run.model, run.copy64(), run.constants, run.images[part], run.labels[part])

    def exact(part: slice) -> Answers:
        return float64_pass(run.copy64(), run.constants, run.images[part], run.labels[part])

    head = shards.map(batches[: shards.world_size], fast)
    float64_first = bool(head) and float(_undecided(run, head[0], batches[0]).double().mean()) > FLOAT64_FIRST
    if float64_first and len(head) > 1:
        head = head[:1] + shards.map(batches[1 : shards.world_size], exact, offset=1)
    if head:
        done(len(head))
    rest = shards.map(batches[len(head) :], exact if float64_first else fast, offset=len(head), on_done=lambda count: done(len(head) + count))
    parts = head + rest
    if not parts:
        parts.append(fast(slice(0, 0)))
    return Answers.cat(parts)


def _undecided(run: _Run, answers: Answers, part: slice = slice(None)) -> torch.Tensor:
    """Points a float64 evaluation could still change an answer of: non-finite values; a class that is not
    certain while the label is one of the candidates (or no label is given: -1); for a correctly classified
    point (or one without a label), an exact radius that may lie on either side of some eps, or cpl-cert's
    float32 network certified below an eps the exact radius may exceed; every point with ``tight_radii``.
    A point whose candidate classes all differ from its label is an error whatever its exact class, and
    counts at no eps. Points already evaluated in float64 are final."""
    labels, eps = run.labels[part], run.eps
    low, high = answers.low[:, None], answers.high[:, None]
    relevant = (labels < 0) | (answers.top == labels)
    straddles = ((low <= eps) & (high > eps)).any(dim=1)
    improvable = ((answers.radius32[:, None] <= eps) & (high > eps)).any(dim=1)
    label_possible = (labels < 0) | (answers.label_gap <= 0)
    open_ = ~answers.finite | ((answers.low <= 0) & label_possible) | (relevant & (straddles | improvable)) | run.tight_radii
    return open_ & ~answers.float64


def _float64_pass(run: _Run, answers: Answers, batch_size: int, shards: Shards) -> None:
    """Evaluate in float64 throughout the points still undecided; updates ``answers`` in place."""
    todo = _undecided(run, answers).nonzero().flatten()
    if todo.numel() == 0:
        return
    run.report("float64", 0, todo.numel())
    parts = [todo[begin : begin + batch_size] for begin in range(0, todo.numel(), batch_size)]
    results = shards.map(
        parts, lambda part: float64_pass(run.copy64(), run.constants, run.images[part], run.labels[part]),
        on_done=lambda count: run.report("float64", min(count * batch_size, todo.numel()), todo.numel()),
    )
    for part, result in zip(parts, results, strict=True):
        answers.take(part, result)


def _run_float32_network(run: _Run, answers: Answers, batch_size: int, shards: Shards) -> None:
    """cpl-cert's float32 network's class where no bound proves it (ties, near ties, non-finite values): run it."""
    todo = (answers.prediction32 == UNKNOWN).nonzero().flatten()
    parts = [todo[begin : begin + batch_size] for begin in range(0, todo.numel(), batch_size)]

    def predict(part: torch.Tensor) -> torch.Tensor:
        x, _ = as_points(run.images[part], torch.float32)
        return float32_prediction(accumulated_logits(run.model, run.copy64(), x))

    for part, prediction in zip(parts, shards.map(parts, predict), strict=True):
        answers.prediction32[part] = prediction


def _fingerprint(model: CPLNet, images: torch.Tensor, labels: torch.Tensor, eps: list[EpsValue], batch_size: int, tight: bool) -> str:
    """SHA-256 of the weights, the points and the options: the processes of a job must evaluate the same."""
    digest = hashlib.sha256(repr(([e.value for e in eps], batch_size, tight, tuple(images.shape))).encode())
    for name, tensor in [*sorted(model.state_dict().items()), ("images", images), ("labels", labels)]:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _result(answers: Answers, labels: torch.Tensor, eps: list[EpsValue], bounds: LipschitzBounds, device: str) -> CertifyResult:
    """Per-sample answers: the exact class where certain, radii in each sense and the radius valid for two."""
    decided = answers.finite & (answers.low > 0)
    prediction = torch.where(decided, answers.top, torch.full_like(answers.top, -1))
    exact = torch.where(decided, answers.low, torch.zeros_like(answers.low))
    agree = decided & (answers.prediction32 == prediction)
    both = torch.where(agree, torch.minimum(exact, answers.radius32), torch.zeros_like(exact))
    margin = torch.where(answers.finite, answers.margin, torch.full_like(answers.margin, math.nan))
    return CertifyResult(
        labels=labels.cpu(), predictions=prediction.cpu(), predictions_float32=answers.prediction32.cpu(),
        predictions_any=answers.prediction_any.cpu(), margins=margin.cpu(), radii=both.cpu(), radii_exact=exact.cpu(),
        radii_float32=answers.radius32.cpu(), radii_any=answers.radius_any.cpu(), eps=eps, bounds=bounds, device=device, seconds=0.0,
    )


def certificate_constants(model: CPLNet, bounds: LipschitzBounds | None = None) -> tuple[LipschitzBounds, ErrorModel]:
    """The model's certified bounds and rounding constants; computed once per set of weights and cached
    on the model (any in-place change of a parameter or buffer invalidates the cache)."""
    key = weights_key(model)
    cached = model.__dict__.get("_certificate_constants")
    if bounds is None and cached is not None and cached[0] == key:
        return cached[1], cached[2]
    validate_model(model)
    given = bounds is not None
    bounds = bounds if given else lipschitz_bounds(model)
    constants = error_model(model, bounds)
    if not given:
        model.__dict__["_certificate_constants"] = (key, bounds, constants)
    return bounds, constants
