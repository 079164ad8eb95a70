"""Training throughput (images/s) of the real training step: augmentation + forward + loss + backward + Adam.

    PYTHONPATH=. python benchmarks/train_speed.py [--device cpu] [--steps 5] [--threads N]

Prints images/s for cpl-s on 3x32x32 and cpl-xs / cpl-tiny on 1x28x28 (random uint8 data on the device).
Add ``--bf16`` or ``--compile`` to measure those modes. Figures go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import time

import torch

from cpl_cert import build_model
from cpl_cert.data import to_float_images
from cpl_cert.device import resolve_device
from cpl_cert.train.augment import make_augment
from cpl_cert.train.losses import make_loss


def measure(preset: str, shape: tuple[int, int, int], device: torch.device, batch: int, steps: int, warmup: int, bf16: bool, compile_: bool) -> float:
    torch.manual_seed(0)
    model = build_model(preset, input_shape=shape, num_classes=10).to(device).train()
    step_model = torch.compile(model) if compile_ else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = make_loss("hinge")
    augment = make_augment("auto", shape)
    images = torch.randint(0, 256, (batch * 4, *shape), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (batch * 4,), device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        index = torch.randint(0, images.shape[0], (batch,), device=device, generator=generator)
        x = to_float_images(augment(images[index], generator))
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(step_model(x), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (default: 5 on CPU, 50 on GPU)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated subset of: cpl-s,cpl-xs,cpl-tiny")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    steps = args.steps or (50 if device.type == "cuda" else 5)
    warmup = 10 if device.type == "cuda" else 1
    cases = [("cpl-s", (3, 32, 32)), ("cpl-xs", (1, 28, 28)), ("cpl-tiny", (1, 28, 28))]
    if args.only:
        cases = [c for c in cases if c[0] in args.only.split(",")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device} ({name}); batch {args.batch_size}; {steps} timed steps; bf16={args.bf16} compile={args.compile}")
    for preset, shape in cases:
        rate = measure(preset, shape, device, args.batch_size, steps, warmup, args.bf16, args.compile)
        print(f"{preset:9s} {'x'.join(map(str, shape)):8s} {rate:10,.0f} images/s")


if __name__ == "__main__":
    main()
