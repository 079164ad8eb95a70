"""Throughput of ``cpl_cert.certify`` against a bare ``model(x)`` loop (same data, device, batch size).

A certificate is one forward pass that also measures activation norms (for the rounding bound), a
few float64 ops per batch, and a float64 re-evaluation of the points whose exact answer at some eps
the float32 pass cannot decide. The ratio certify / bare says what that costs. Run:

    PYTHONPATH=. python benchmarks/certify_speed.py [--device cpu|cuda] [--batch-size 256]

Defaults keep a CPU run to a minute or two (few images for cpl-s); on a GPU use more
(``--n-large 10000 --n-small 10000``).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

import cpl_cert
from cpl_cert.data import load_dataset, to_float_images
from cpl_cert.device import resolve_device

MODELS = Path(__file__).resolve().parents[1] / "models"
SHIPPED = ("fmnist-cpl-xs", "fmnist-cpl-best")
EPS = [0.1, 0.25, 0.5, 1.0]  # the radii `cpl-cert certify` uses on 28x28 data: each one adds re-evaluations


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def bare_loop(model: torch.nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Seconds for ``model(x)`` over all images (data already on the device), nothing else."""
    _sync(device)
    start = time.perf_counter()
    for begin in range(0, images.shape[0], batch_size):
        model(to_float_images(images[begin : begin + batch_size]))
    _sync(device)
    return time.perf_counter() - start


def measure(name: str, model: cpl_cert.CPLNet, images: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    model = model.to(device).eval()
    bounds = cpl_cert.lipschitz_bounds(model)  # once per checkpoint, as the CLI does; not part of either timing
    images_dev = images.to(device)
    n = images.shape[0]
    warm = min(n, args.batch_size)
    bare_loop(model, images_dev[:warm], args.batch_size, device)
    cpl_cert.certify(model, (images_dev[:warm], labels[:warm]), eps=[0.1], device=device, batch_size=args.batch_size, bounds=bounds)
    bare, cert = [], []
    for _ in range(args.repeats):  # interleaved, best of each: robust to a shared, noisy machine
        bare.append(n / bare_loop(model, images_dev, args.batch_size, device))
        result = cpl_cert.certify(model, (images_dev, labels), eps=EPS, device=device, batch_size=args.batch_size, bounds=bounds)
        cert.append(result.images_per_second)
    b, c = max(bare), max(cert)
    print(
        f"{name:<34} n={n:<6} batch={args.batch_size:<5} bare {b:9.1f} img/s   certify {c:9.1f} img/s   "
        f"ratio {c / b:.3f}   (re-checked in float64: {result.rechecked})",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--n-large", type=int, default=None, help="images for cpl-s on 3x32x32 (default 256 on CPU, 10000 on GPU)")
    parser.add_argument(
        "--n-small", type=int, default=None, help="Fashion-MNIST test images for the small preset (default 2000 on CPU, 10000 on GPU)"
    )
    parser.add_argument("--small-preset", default="cpl-xs")
    parser.add_argument("--presets", default="cpl-s", help="comma-separated presets to measure at 3x32x32 (random, frozen)")
    parser.add_argument("--skip-small", action="store_true", help="only the 3x32x32 presets")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    n_large = args.n_large or (10000 if gpu else 256)
    n_small = args.n_small or (10000 if gpu else 2000)
    hardware = torch.cuda.get_device_name(device) if gpu else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, device {device} ({hardware})", flush=True)

    images = torch.randint(0, 256, (n_large, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 10, (n_large,), generator=torch.Generator().manual_seed(2))
    for preset in filter(None, args.presets.split(",")):
        torch.manual_seed(0)
        start = time.perf_counter()
        model = cpl_cert.freeze(cpl_cert.build_model(preset, input_shape=(3, 32, 32), num_classes=10))
        print(f"built and froze {preset} in {time.perf_counter() - start:.1f} s", flush=True)
        measure(f"{preset}, 3x32x32 synthetic", model, images, labels, args)
        del model
    if args.skip_small:
        return
    data = load_dataset("fashion-mnist").subset(n_small)
    model = cpl_cert.freeze(cpl_cert.build_model(args.small_preset, input_shape=(1, 28, 28), num_classes=10), max_iters=50)
    measure(f"{args.small_preset} (random), fashion-mnist test", model, data.images, data.labels, args)
    for name in SHIPPED:
        shipped, _ = cpl_cert.load_checkpoint(MODELS / f"{name}.safetensors")
        measure(f"models/{name} (trained), test", shipped, data.images, data.labels, args)


if __name__ == "__main__":
    main()
