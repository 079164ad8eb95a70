"""How tight the rounding bounds are, per network size: the bound of the features' rounding error against
the error actually made, for the two float32 networks cpl-cert certifies.

* plain float32 (``radii_any``: any correctly rounded runtime, any summation order; the only float32
  certificate before cpl-cert's own float32 network existed);
* cpl-cert's float32 network (``radii_float32``: float32 activations, every dot product accumulated in
  float64).

For each network (random frozen presets at 3x32x32 and the shipped Fashion-MNIST models) it prints, over a
few uint8 images, the bound ``E`` in radius units (``E / L_body``: how far rounding can move a radius) and
the measured distance between the network's float32 features and a float64 evaluation's. Run:

    OMP_NUM_THREADS=1 python benchmarks/rounding_allowance.py [--presets cpl-xs,cpl-s,cpl-m,cpl-l,cpl-xl] [--images 8]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

import cpl_cert
from cpl_cert.certification import certificate_constants
from cpl_cert.models import float64_copy
from cpl_cert.numerics import FLOAT32, FLOAT32_ACC64, FLOAT64, strict_math
from cpl_cert.passes import accumulated_features, trace_body
from cpl_cert.radii import as_points
from cpl_cert.rounding import ball_body_error

MODELS = Path(__file__).resolve().parents[1] / "models"


@torch.inference_mode()
def measure(name: str, model: cpl_cert.CPLNet, images: torch.Tensor) -> None:
    """One line per float32 network: bound and real error of the features, in radius units."""
    with strict_math():
        bounds, constants = certificate_constants(model)
        model64 = float64_copy(model)
        x64, _ = as_points(images, torch.float64)
        x32, _ = as_points(images, torch.float32)
        exact, trace = trace_body(model64, x64)
        zero = torch.zeros(images.shape[0], dtype=torch.float64)
        here = constants.plan(FLOAT64)
        for label, arithmetic, features in (
            ("plain float32 (any runtime)", FLOAT32, model.features(x32)),
            ("cpl-cert float32 (float64 acc.)", FLOAT32_ACC64, accumulated_features(model, model64, x32)),
        ):
            bound, _ = ball_body_error(constants, trace, here, constants.plan(arithmetic), zero)
            real = (features.double() - exact).norm(dim=1)
            scale = bounds.body_upper
            print(f"{name:<28} {label:<32} bound E/L {float(bound.mean()) / scale:10.3g}  real {float(real.mean()) / scale:10.3g}  "
                  f"bound/real {float((bound / real).mean()):10.3g}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="cpl-xs,cpl-s,cpl-m,cpl-l,cpl-xl")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, torch {torch.__version__}, {args.threads} threads, {args.images} images")
    generator = torch.Generator().manual_seed(0)
    for name in ("fmnist-cpl-xs", "fmnist-cpl-best"):
        model, _ = cpl_cert.load_checkpoint(MODELS / f"{name}.safetensors")
        measure(name, model, cpl_cert.load_dataset("fashion-mnist").images[: args.images])
    for preset in args.presets.split(","):
        start = time.perf_counter()
        torch.manual_seed(0)
        model = cpl_cert.freeze(cpl_cert.build_model(preset, input_shape=(3, 32, 32), num_classes=10))
        images = torch.randint(0, 256, (args.images, 3, 32, 32), generator=generator, dtype=torch.uint8)
        measure(f"{preset} 3x32x32 (random)", model.eval(), images)
        print(f"  ({time.perf_counter() - start:.0f} s with the freeze)", flush=True)


if __name__ == "__main__":
    main()
