"""Speed-up of ``certify`` and ``attack`` split over N processes by torchrun (gloo, one CPU thread each).

Runs each command as ``torchrun --standalone --nproc-per-node N -m cpl_cert ... --threads 1`` for every N
given (N = 1 runs torchrun too, so that each row pays the same start-up), repeated and interleaved,
and prints per command and N: the best wall-clock time of the whole command (start-up, loading, the
certified bound and writing included), the best time the report gives for the evaluation itself
(``seconds``: certify's passes, or the attack run with its certification), the speed-up of each over
N = 1, and whether every run's report equals the N = 1 report (all fields but timings). Run:

    PYTHONPATH=. python benchmarks/torchrun_speed.py [--processes 1,2] [--repeats 2] [--certify-limit 10000] [--attack-limit 200]

The load average before and after is printed: on a shared machine the figures say as much about the
neighbours as about cpl-cert.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "fmnist-cpl-xs.safetensors"
PER_RUN = {"seconds", "images_per_second", "processes"}


def commands(args: argparse.Namespace) -> dict[str, list[str]]:
    return {
        "certify": ["certify", str(MODEL), "--limit", str(args.certify_limit), "--lower-bound-samples", "0"],
        "attack": ["attack", str(MODEL), "--attack", "minnorm", "--limit", str(args.attack_limit), "--batch-size", str(args.attack_batch)],
    }


def run(command: list[str], processes: int, report: Path) -> tuple[float, float, dict[str, object]]:
    """Wall seconds of the whole command, the report's seconds, and the report without its timings."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m", "cpl_cert",
        *command, "--threads", "1", "--device", "cpu", "--json", str(report),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    data = json.loads(report.read_text())
    return wall, float(data["seconds"]), {k: v for k, v in data.items() if k not in PER_RUN}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--certify-limit", type=int, default=10000)
    parser.add_argument("--attack-limit", type=int, default=200)
    parser.add_argument("--attack-batch", type=int, default=50, help="attack batch size (several batches per process)")
    parser.add_argument("--only", choices=["certify", "attack"])
    args = parser.parse_args()
    counts = [int(p) for p in args.processes.split(",")]
    print(f"load average before: {os.getloadavg()}; {os.cpu_count()} cores", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, command in commands(args).items():
            if args.only and name != args.only:
                continue
            best: dict[int, tuple[float, float]] = {}
            reference, equal = None, True
            for _ in range(args.repeats):
                for n in counts:
                    wall, seconds, results = run(command, n, Path(folder) / f"{name}-{n}.json")
                    reference = reference if reference is not None else results
                    equal &= results == reference
                    old = best.get(n, (float("inf"), float("inf")))
                    best[n] = (min(old[0], wall), min(old[1], seconds))
                    print(f"  {name} N={n}: wall {wall:.1f} s, evaluation {seconds:.1f} s", flush=True)
            for n in counts:
                wall, seconds = best[n]
                rows.append((name, n, wall, seconds, best[counts[0]][0] / wall, best[counts[0]][1] / seconds, equal))
    print(f"load average after: {os.getloadavg()}")
    print(f"{'command':8} {'N':>3} {'wall s':>8} {'eval s':>8} {'wall x':>7} {'eval x':>7}  reports equal")
    for name, n, wall, seconds, wall_x, eval_x, equal in rows:
        print(f"{name:8} {n:>3} {wall:>8.1f} {seconds:>8.1f} {wall_x:>7.2f} {eval_x:>7.2f}  {equal}")


if __name__ == "__main__":
    main()
