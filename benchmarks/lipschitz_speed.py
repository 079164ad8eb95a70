"""How long freezing a fresh model and computing its certified Lipschitz bounds take, before and after.

    PYTHONPATH=. python benchmarks/lipschitz_speed.py [--presets cpl-xs,cpl-s] [--threads N] [--repeats 3] [--no-legacy]

For each preset (built at 3x32x32 with seed 0) it times, interleaved in one process on copies of the same model:
``freeze`` as it is now (step from the certified bound: a Lanczos estimate and a Cholesky certificate per large
dense layer, a Lanczos-refreshed report vector per other layer), the freeze it replaced (``eigvalsh`` of every
dense Gram matrix and 100 warm-started power iterations per layer; reproduced below), and ``lipschitz_bounds``
(what ``cpl-cert lipschitz`` and ``certify`` pay once per checkpoint). Prints the best and median of the repeats,
the load average, how the two freezes' steps compare, and where one dense layer's time goes.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import cpl_cert
from cpl_cert import dense_norm
from cpl_cert.freezing import step_for_sigma
from cpl_cert.layers import CPLConv2d, CPLLinear
from cpl_cert.numerics import gamma, round_up, strict_math, unit_roundoff
from cpl_cert.spectral import conv_sigma_upper, power_iteration


def legacy_dense_sigma_upper(weight: torch.Tensor) -> float:
    """The dense bound before the Cholesky certificate: ``eigvalsh`` of the full float64 Gram product."""
    w = weight.detach().double()
    gram = w @ w.t() if w.shape[0] <= w.shape[1] else w.t() @ w
    top = float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0.0))
    absolute = w.abs()
    gram_error = gamma(max(w.shape), torch.float64) * float(absolute.sum(0).max()) * float(absolute.sum(1).max())
    return round_up((top + gram_error + min(w.shape) * unit_roundoff(torch.float64) * top) ** 0.5)


def legacy_freeze(model: torch.nn.Module, iters: int = 100) -> None:
    """The freeze before: certified step, then ``iters`` power iterations (conv_transpose2d for W^T) for the report."""
    model.eval()
    with strict_math(), torch.no_grad():
        for layer in model.modules():
            if not isinstance(layer, (CPLLinear, CPLConv2d)):
                continue
            conv = isinstance(layer, CPLConv2d)
            sigma = conv_sigma_upper(layer.weight, layer.input_size) if conv else legacy_dense_sigma_upper(layer.weight)
            w = layer.weight.detach().float()
            ops = (
                ((lambda x, w=w: F.conv2d(x, w, padding=1)), (lambda y, w=w: F.conv_transpose2d(y, w, padding=1)))
                if conv
                else ((lambda x, w=w: F.linear(x, w)), (lambda y, w=w: F.linear(y, w.t())))
            )
            _, u = power_iteration(*ops, layer.u.float(), iters, 1e-7, check_every=10)
            layer.u.copy_(u)
            layer.set_frozen_step(step_for_sigma(sigma))


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def summary(times: list[float]) -> str:
    return f"best {min(times):6.2f} s, median {statistics.median(times):6.2f} s"


def dense_breakdown(layer: CPLLinear) -> str:
    """Seconds of the Gram product, the Lanczos estimate and the Cholesky certificate of one dense layer."""
    weight = layer.weight.detach()
    side = weight if weight.shape[0] <= weight.shape[1] else weight.t()
    start = time.perf_counter()
    matrix = dense_norm.gram(side)
    gram_done = time.perf_counter()
    theta, _ = dense_norm.estimate_top(matrix)
    estimate_done = time.perf_counter()
    dense_norm.shifted_bound(matrix, theta, dense_norm.gram_error(weight))
    end = time.perf_counter()
    return f"Gram {gram_done - start:.2f} s, Lanczos {estimate_done - gram_done:.2f} s, Cholesky {end - estimate_done:.2f} s"


def bench(preset: str, repeats: int, legacy: bool) -> None:
    torch.manual_seed(0)
    model = cpl_cert.build_model(preset, input_shape=(3, 32, 32), num_classes=10)
    new_times, old_times, bound_times = [], [], []
    for _ in range(repeats):
        frozen = copy.deepcopy(model)
        new_times.append(timed(cpl_cert.freeze, frozen))
        if legacy:
            old = copy.deepcopy(model)
            old_times.append(timed(legacy_freeze, old))
        bound_times.append(timed(cpl_cert.lipschitz_bounds, frozen))
    bounds = cpl_cert.lipschitz_bounds(frozen)
    dense = sum(isinstance(m, CPLLinear) for m in model.modules())
    convs = sum(isinstance(m, CPLConv2d) for m in model.modules())
    print(f"{preset} 3x32x32: {cpl_cert.count_parameters(model):,} parameters, {convs} conv + {dense} dense CPL layers")
    print(f"  freeze (now)            {summary(new_times)}")
    if legacy:
        print(f"  freeze (before)         {summary(old_times)}   speed-up {statistics.median(old_times) / statistics.median(new_times):.1f}x")
        pairs = zip(frozen.modules(), old.modules(), strict=True)
        steps = [(float(a.step), float(b.step)) for a, b in pairs if isinstance(a, (CPLLinear, CPLConv2d))]
        print(f"  steps, now vs before:   largest relative difference {max(abs(a - b) / b for a, b in steps):.1e}")
    print(f"  lipschitz_bounds        {summary(bound_times)}; network upper bound {bounds.upper:.9g}")
    worst = max((row.sigma_upper / row.sigma_power - 1) for row in bounds.layers if row.sigma_upper and row.kind == "cpl-dense")
    print(f"  dense layers: certified sigma_upper / reported sigma_power - 1 <= {worst:.1e}")
    first = next(m for m in model.modules() if isinstance(m, CPLLinear))
    print(f"  one {tuple(first.weight.shape)} dense layer: {dense_breakdown(first)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="cpl-xs,cpl-s")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-legacy", action="store_true", help="skip the freeze it replaced (slow)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads, load average {load}")
    for preset in args.presets.split(","):
        bench(preset, args.repeats, not args.no_legacy)
    print(f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
