"""How long the exact Lipschitz bounds of a frozen cpl-s (3x32x32) take.

Run: python benchmarks/lipschitz_speed.py [--threads N] [--preset cpl-s]
Prints the time of freeze (one-off) and of lipschitz_bounds (what `cpl-cert lipschitz` and
`cpl-cert certify` pay once per checkpoint). Target: bounds under 10 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import cpl_cert


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="cpl-s")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = cpl_cert.build_model(args.preset, input_shape=(3, 32, 32), num_classes=10)
    start = time.perf_counter()
    cpl_cert.freeze(model)
    freeze_seconds = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        bounds = cpl_cert.lipschitz_bounds(model)
        times.append(time.perf_counter() - start)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads")
    print(f"{args.preset} 3x32x32: {cpl_cert.count_parameters(model):,} parameters, "
          f"{sum(1 for row in bounds.layers if row.kind.startswith('cpl'))} CPL layers")
    print(f"freeze (power iteration to convergence + certified step): {freeze_seconds:.2f} s")
    print(f"lipschitz_bounds: best {min(times):.2f} s, median {sorted(times)[len(times) // 2]:.2f} s "
          f"over {args.repeats} runs (target < 10 s); network upper bound {bounds.upper:.9g}")


if __name__ == "__main__":
    main()
