"""Soundness campaign: try to beat cpl-cert's Lipschitz bounds and certified radii on many models.

For every model configuration (every preset at small input sizes, std != 1, LLN and truncation heads,
weights scaled after freezing, unfrozen models, near-identity and all-units-active constructions, and
briefly trained models; the same for SLL layers, plus SLL rescalings scaled after freezing, tight Hadamard
layers, and networks imported from SLL-code checkpoints of both layer versions, built by the tests'
stand-in ``tests/sll_net.py``) it

* compares the certified network bound with the largest Jacobian norm found: exact float64 Jacobians
  (SVD; power iteration on inputs above 1,024 entries) at random inputs, plus gradient ascent on the secant ratio ``||f(x + d) - f(x)|| / ||d||``;
* certifies random images and attacks each with a float64 minimum-norm search (FMN + bisection on the
  float64 model), keeping only adversarial examples whose class the exact function provably changes,
  and with the same search on the float32 model, keeping examples that cpl-cert's float32 network
  (float64 accumulation) misclassifies, and examples PyTorch's plain float32 forward misclassifies (one
  of the runtimes ``radii_any`` covers).

Configurations at extreme scales feed float images multiplied by 1e-25 or 1e25 (the "box" the attacks
stay in scales with them), or rescale a model's normalisation (std 1e25 or 1e-25, biases to match).
It prints per configuration and overall the worst ``lower / upper`` bound ratio (must be <= 1) and the
worst ``adversarial distance / radius`` ratio for each sense (must be >= 1). Run:

    OMP_NUM_THREADS=1 python benchmarks/soundness_campaign.py [--points 16] [--quick]

The configurations and checks live in ``tests/campaign.py``; ``tests/test_campaign.py`` runs the ``--quick``
ones with few points in the suite. ``--only "(3, 32, 32)"`` runs the paper sizes alone (minutes each).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from campaign import configurations, run_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=16, help="images attacked per configuration")
    parser.add_argument("--steps", type=int, default=200, help="FMN iterations per attack")
    parser.add_argument("--quick", action="store_true", help="one configuration of each kind")
    parser.add_argument("--only", default="", help="only the configurations whose name contains this text")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    outcomes = []
    chosen = [c for c in configurations(args.quick) if args.only in c[0]]
    if not chosen:
        parser.error(f"no configuration's name contains {args.only!r}")
    for name, build in chosen:
        outcome = run_config(name, build, args.points, args.steps)
        outcomes.append(outcome)
        print(
            f"{name:<32} upper {outcome.upper:10.5g}  lower {outcome.lower:10.5g}  lower/upper {outcome.lower / outcome.upper:7.4f}  "
            f"min d/r exact {outcome.worst_exact:8.4g}  float32 {outcome.worst_float32:8.4g}  any {outcome.worst_any:8.4g}  "
            f"compared {outcome.compared:3d}  "
            f"violations {outcome.violations}",
            flush=True,
        )
    print(
        f"\n{len(outcomes)} configurations, {sum(o.points for o in outcomes)} attacked points "
        f"({sum(o.compared for o in outcomes)} with a verified adversarial example inside the box), {time.perf_counter() - start:.0f} s\n"
        f"worst lower/upper bound ratio: {max(o.lower / o.upper for o in outcomes):.6f} (must be <= 1)\n"
        f"worst adversarial distance / radius: exact function {min(o.worst_exact for o in outcomes):.6g}, "
        f"cpl-cert's float32 network {min(o.worst_float32 for o in outcomes):.6g}, "
        f"plain float32 {min(o.worst_any for o in outcomes):.6g} (must be >= 1)\n"
        f"violations: {sum(o.violations for o in outcomes)}"
    )


if __name__ == "__main__":
    main()
