"""Violation campaign (issue 17 part 3): attack many test points of several models and compare every
verified adversarial example with every certificate the certify result reports.

For each model (``--models``; default the shipped ``fmnist-cpl-xs``, ``fmnist-cpl-best`` and
``fmnist-cpl-xs-m1``) the first ``--points`` test points are attacked in chunks of ``--chunk``:

* certified with ``cpl_cert.certify`` (the chunk alone; radii are per point);
* attacked with the native FMN minimum-norm attack (``run_suite(attack="minnorm")``: each point's
  smallest adversarial distance found);
* the first ``--apgd-points`` of them also with the authors' APGD-CE + APGD-T (``--engine autoattack
  --attack apgd``, the optional extra autoattack) at the dataset's standard radii (``--apgd-eps``).

Every example is re-verified by cpl-cert (``cpl_cert.attacks.check``). The senses come from the
certify result, generically: every field ``radii_<sense>`` is a certificate, compared with the attack
suite's verified distances of the same sense (``distance`` for ``exact``, ``distance_<sense>``
otherwise); a sense the suite does not verify is reported as unchecked, never skipped silently.
A violation is a verified example provably closer than the radius (``check.beats``, the library's rule).

Resumable: one JSON line per (model, attack, chunk) is appended to ``--out`` as soon as the chunk is
done; a restart with the same file skips the chunks already there (keyed by the model's sha256, the
attack and the chunk's points). The summary is printed from the whole file: per model and attack, the
points attacked, broken (in each sense), the smallest distance / radius ratio per sense (>= 1 when the
certificates hold) and every violation. Exit code 3 when there is one. Run (from the repository root):

    OMP_NUM_THREADS=1 python benchmarks/violation_campaign.py --points 3400 --apgd-points 340 --out runs/campaign.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import cpl_cert
from cpl_cert.attacks import run_suite
from cpl_cert.attacks.check import beats
from cpl_cert.certification import CertifyResult
from cpl_cert.data import ImageDataset, to_float_images
from cpl_cert.eps import parse_eps
from cpl_cert.files import file_sha256
from cpl_cert.radii import exact_points

MODELS = ("models/fmnist-cpl-xs.safetensors", "models/fmnist-cpl-best.safetensors", "models/fmnist-cpl-xs-m1.safetensors")
ATTACKS = {"fmn": {"attack": "minnorm", "engine": "native"}, "apgd": {"attack": "apgd", "engine": "autoattack"}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="checkpoints to attack")
    parser.add_argument("--points", type=int, default=100, help="first test points of each model attacked with FMN")
    parser.add_argument("--apgd-points", type=int, default=20, help="of those, how many the authors' APGD also attacks (0: none)")
    parser.add_argument("--apgd-eps", default=None, help="radii of the APGD runs (default: the dataset's standard list)")
    parser.add_argument("--chunk", type=int, default=50, help="points per chunk (the unit of resumption)")
    parser.add_argument("--out", type=Path, default=Path("runs/violation_campaign.jsonl"), help="results, one JSON line per chunk")
    parser.add_argument("--dataset", default=None, help="dataset name (default: each checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared CPU)")
    args = parser.parse_args(argv)
    if args.points < 1 or args.chunk < 1 or args.apgd_points < 0:
        parser.error("--points and --chunk must be positive, --apgd-points at least 0")
    return args


def certificate_senses(cert: CertifyResult) -> dict[str, torch.Tensor]:
    """Every certified radius the certify result reports, by sense: its fields ``radii_<sense>``."""
    return {
        f.name.removeprefix("radii_"): getattr(cert, f.name)
        for f in dataclasses.fields(cert)
        if f.name.startswith("radii_") and isinstance(getattr(cert, f.name), torch.Tensor)
    }


def verified_distances(suite: Any, sense: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per point, the smallest distance the suite verified in ``sense`` over all radii, and the index of the
    radius it was found at; ``None`` when the suite does not verify examples in that sense."""
    table = getattr(suite, "distance" if sense == "exact" else f"distance_{sense}", None)
    if not isinstance(table, torch.Tensor):
        return None
    return table.min(dim=0) if table.shape[0] else (torch.full((table.shape[1],), math.inf, dtype=torch.float64), table.new_zeros(0))


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def point_records(cert: CertifyResult, suite: Any, start: int) -> list[dict[str, Any]]:
    """One record per point: its test index, label, and per sense the radius, the closest verified example
    (distance, attack, radius it was found at) and whether it violates the certificate."""
    records = [{"index": start + i, "label": int(cert.labels[i]), "senses": {}} for i in range(cert.n)]
    for sense, radii in certificate_senses(cert).items():
        found = verified_distances(suite, sense)
        for i, record in enumerate(records):
            entry: dict[str, Any] = {"radius": float(radii[i]), "checked": found is not None}
            if found is not None:
                distance, where = float(found[0][i]), int(found[1][i]) if found[1].numel() else -1
                entry.update(
                    distance=_finite(distance),
                    attack=suite.source_of(where, i, sense) if math.isfinite(distance) else None,
                    violation=bool(beats(found[0][i : i + 1], radii[i : i + 1]).item()),
                )
            record["senses"][sense] = entry
    return records


def chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(start + size, n)


def done_chunks(out: Path) -> set[tuple[str, str, int, int]]:
    """The (sha256, attack, start, stop) keys already in the results file (a torn last line is ignored)."""
    keys = set()
    if out.exists():
        for line in out.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            keys.add((row["sha256"], row["attack"], row["start"], row["stop"]))
    return keys


def attack_chunk(model: Any, data: ImageDataset, start: int, stop: int, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Certify and attack test points ``start:stop`` with attack ``name`` (``ATTACKS``); the chunk's JSON line."""
    part = dataclasses.replace(data, images=data.images[start:stop], labels=data.labels[start:stop])
    began = time.perf_counter()
    cert = cpl_cert.certify(model, part, eps=list(data.default_eps), device="cpu", batch_size=args.batch_size)
    # FMN's distances do not depend on a radius (one suffices); APGD runs at each radius in turn.
    eps = [e.value for e in parse_eps(args.apgd_eps or ",".join(data.default_eps))] if name == "apgd" else [1.0]
    suite = run_suite(
        model, to_float_images(part.images), cert.predictions, eps, batch_size=args.batch_size,
        seed=args.seed, reference_float32=cert.predictions_float32, clean=exact_points(part.images), **ATTACKS[name],
    )
    return {
        "attack": name, "start": start, "stop": stop, "eps": eps if name == "apgd" else None,
        "settings": suite.settings, "engine_warnings": suite.extra.get("engine_warnings", []),
        "rejected": suite.rejected, "points": point_records(cert, suite, start), "seconds": time.perf_counter() - began,
    }


def run_campaign(args: argparse.Namespace) -> None:
    """Attack every chunk not yet in ``args.out`` and append its line as soon as it is done."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = done_chunks(args.out)
    for path in args.models:
        model, meta = cpl_cert.load_checkpoint(path)
        sha = file_sha256(Path(path))
        data = cpl_cert.load_dataset(args.dataset or meta["dataset"]["name"], split="test")
        points = min(args.points, len(data))
        plan = [("fmn", start, stop) for start, stop in chunks(points, args.chunk)]
        plan += [("apgd", start, stop) for start, stop in chunks(min(args.apgd_points, points), args.chunk)]
        for name, start, stop in plan:
            if (sha, name, start, stop) in done:
                continue
            row = {"model": path, "sha256": sha, **attack_chunk(model, data, start, stop, name, args)}
            with args.out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            broken = sum(any(s.get("distance") is not None for s in p["senses"].values()) for p in row["points"])
            print(f"{Path(path).name} {name} points {start}-{stop}: {broken} broken, {row['seconds']:.1f} s", flush=True)


def summarise(out: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (model, attack) from the whole results file: points, broken and smallest ratio per sense, violations."""
    summary: dict[tuple[str, str], dict[str, Any]] = {}
    for line in out.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        entry = summary.setdefault((Path(row["model"]).name, row["attack"]), {"points": 0, "seconds": 0.0, "senses": {}, "violations": []})
        entry["points"] += len(row["points"])
        entry["seconds"] += row["seconds"]
        for point in row["points"]:
            for sense, value in point["senses"].items():
                stats = entry["senses"].setdefault(sense, {"checked": 0, "broken": 0, "min_ratio": math.inf, "at": None})
                stats["checked"] += bool(value["checked"])
                if value.get("distance") is None:
                    continue
                stats["broken"] += 1
                ratio = value["distance"] / value["radius"] if value["radius"] > 0 else math.inf
                if ratio < stats["min_ratio"]:
                    stats["min_ratio"], stats["at"] = ratio, point["index"]
                if value.get("violation"):
                    entry["violations"].append({"index": point["index"], "sense": sense, **value})
    return summary


def print_summary(summary: dict[tuple[str, str], dict[str, Any]]) -> int:
    """Print the table, the smallest ratio per sense over everything and every violation; the number of violations."""
    points, seconds, overall, violations = 0, 0.0, {}, []
    print(f"{'model':<32} {'attack':<6} {'points':>7} {'sense':<9} {'checked':>8} {'broken':>7} {'min d/r':>10} {'at index':>9}")
    for (model, attack), entry in sorted(summary.items()):
        points, seconds = points + entry["points"], seconds + entry["seconds"]
        for sense, stats in sorted(entry["senses"].items()):
            ratio = f"{stats['min_ratio']:.6f}" if math.isfinite(stats["min_ratio"]) else "-"
            row = f"{model:<32} {attack:<6} {entry['points']:>7} {sense:<9} {stats['checked']:>8} {stats['broken']:>7} {ratio:>10}"
            print(f"{row} {str(stats['at']):>9}")
            overall[sense] = min(overall.get(sense, math.inf), stats["min_ratio"])
        violations += [(model, attack, v) for v in entry["violations"]]
    print(f"{points} point attacks in {seconds:.0f} s; smallest distance / radius: "
          + ", ".join(f"{sense} {value:.6f}" for sense, value in sorted(overall.items())))
    for model, attack, v in violations:
        print(f"VIOLATION {model} {attack} index {v['index']} ({v['sense']}): "
              f"distance {v['distance']:.9g} < radius {v['radius']:.9g} ({v['attack']})")
    print(f"{len(violations)} violations")
    return len(violations)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    run_campaign(args)
    return 3 if print_summary(summarise(args.out)) else 0


if __name__ == "__main__":
    raise SystemExit(main())
