"""Training throughput (images/s) of the real training step, today's against the one it replaced.

    PYTHONPATH=. python benchmarks/train_speed.py [--device cpu] [--steps 10] [--threads N] [--only cpl-xs]

A step is what ``cpl-cert train`` runs: on-device augmentation, forward, hinge loss, backward, Adam, on
random uint8 images resident on the device. For each preset two copies of the same model (same
initialisation, same batches) are trained side by side, their steps interleaved: ``now`` is the library's
training forward (bias inside the product, ReLU in place, the step folded into ``W^T``'s weights,
channels-last convolutions on the CPU); ``before`` is the forward it replaced (``update(x, hidden(x), step)`` under autograd),
reproduced below; with ``--compile``, ``now`` is the compiled step and ``before`` the eager one, both
today's. Prints the median wall-clock rate of each, the ratio of medians in wall-clock and in CPU
time (the latter steadier on a shared machine), and the largest relative difference of the two copies'
losses over the run. Add ``--bf16`` or ``--compile`` to measure those modes. Figures go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import time
from collections.abc import Iterator

import torch

from cpl_cert import build_model
from cpl_cert.data import to_float_images
from cpl_cert.device import resolve_device
from cpl_cert.layers import STEP_EPSILON, _CPLBase, _no_autocast
from cpl_cert.train.augment import make_augment
from cpl_cert.train.losses import make_loss


def legacy_forward(self: _CPLBase, x: torch.Tensor) -> torch.Tensor:
    """The training forward before: ``update(x, hidden(x), step)`` with autograd's generic backward."""
    if not self.training:
        return self.update(x, self.hidden(x), self.current_step())
    self._frozen = False
    with _no_autocast(x.device.type):
        sigma = self._training_sigma()
    return self.update(x, self.hidden(x), 2.0 / (sigma**2 + STEP_EPSILON))


@contextlib.contextmanager
def forward_of(kind: str) -> Iterator[None]:
    """Run CPL layers with today's forward (``now``) or the replaced one (``before``)."""
    current = _CPLBase.forward
    if kind == "before":
        _CPLBase.forward = legacy_forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        _CPLBase.forward = current  # type: ignore[method-assign]


class Trainer:
    """One model copy with its optimiser and its own generator (so both copies see the same batches)."""

    def __init__(self, model: torch.nn.Module, shape: tuple[int, int, int], device: torch.device, compile_: bool) -> None:
        self.model = model.to(device).train()
        self.step_model = torch.compile(self.model) if compile_ else self.model
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.generator = torch.Generator(device=device).manual_seed(0)
        self.loss_fn, self.augment = make_loss("hinge"), make_augment("auto", shape)
        self.losses: list[float] = []

    def step(self, images: torch.Tensor, labels: torch.Tensor, batch: int, bf16: bool) -> None:
        index = torch.randint(0, images.shape[0], (batch,), device=images.device, generator=self.generator)
        x = to_float_images(self.augment(images[index], self.generator))
        with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = self.loss_fn(self.step_model(x), labels[index])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.losses.append(float(loss.detach()))


def measure(preset: str, shape: tuple[int, int, int], device: torch.device, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = build_model(preset, input_shape=shape, num_classes=10)
    images = torch.randint(0, 256, (args.batch_size * 4, *shape), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (args.batch_size * 4,), device=device)
    # --compile: the compiled step against the eager one (a compiled graph keeps the forward it was traced with)
    kinds = {"now": args.compile, "before": False}
    trainers = {kind: Trainer(copy.deepcopy(model), shape, device, compiled) for kind, compiled in kinds.items()}
    wall: dict[str, list[float]] = {kind: [] for kind in trainers}
    cpu: dict[str, list[float]] = {kind: [] for kind in trainers}
    for step in range(args.warmup + args.steps):
        for kind, trainer in trainers.items():
            with forward_of("now" if args.compile else kind):
                sync(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                trainer.step(images, labels, args.batch_size, args.bf16)
                sync(device)
            if step >= args.warmup:
                wall[kind].append(time.perf_counter() - start)
                cpu[kind].append(time.process_time() - start_cpu)
    rate = {kind: args.batch_size / statistics.median(t) for kind, t in wall.items()}
    cpu_ratio = statistics.median(cpu["before"]) / statistics.median(cpu["now"])
    drift = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(trainers["now"].losses, trainers["before"].losses, strict=True))
    print(
        f"{preset:9s} {'x'.join(map(str, shape)):8s} now {rate['now']:8,.0f} images/s   before {rate['before']:8,.0f} images/s   "
        f"ratio {rate['now'] / rate['before']:.2f}x wall, {cpu_ratio:.2f}x CPU time   loss drift {drift:.1e}"
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per variant (default: 10 on CPU, 50 on GPU)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated subset of: cpl-s,cpl-xs,cpl-tiny")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.steps = args.steps or (50 if device.type == "cuda" else 10)
    args.warmup = 10 if device.type == "cuda" else 2
    cases = [("cpl-s", (3, 32, 32)), ("cpl-xs", (1, 28, 28)), ("cpl-tiny", (1, 28, 28))]
    if args.only:
        cases = [c for c in cases if c[0] in args.only.split(",")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"device: {device} ({name}); batch {args.batch_size}; {args.steps} timed steps each; bf16={args.bf16} compile={args.compile}")
    print(f"load average {load}")
    for preset, shape in cases:
        measure(preset, shape, device, args)


if __name__ == "__main__":
    main()
