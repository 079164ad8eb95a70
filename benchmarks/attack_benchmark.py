"""Attack speed and the certificate check on 1,000 Fashion-MNIST test points (prints figures, asserts nothing).

Trains a small dense CPL model for a few hundred steps (so that radii are not all tiny), freezes and
saves it, then runs each attack on ``--points`` test points and prints time, robust accuracy and the
number of violations. Usage:

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/attack_benchmark.py --out /tmp/fm-dense.safetensors
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import cpl_cert
from cpl_cert.attacks import find_violations, run_suite
from cpl_cert.radii import exact_points


def train_dense(steps: int, seed: int) -> cpl_cert.CPLNet:
    torch.manual_seed(seed)
    data = cpl_cert.load_dataset("fashion-mnist", "train")
    model = cpl_cert.build_model(
        "cpl-tiny", input_shape=(1, 28, 28), num_classes=10, conv_depth=0, channels=1, dense_depth=2, dense_inner=64,
        mean=data.mean,
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _step in range(steps):
        idx = torch.randint(0, len(data), (256,))
        x = data.images[idx].float() / 255
        loss = F.multi_margin_loss(model(x), data.labels[idx], margin=0.7)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return cpl_cert.freeze(model)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, default=1000)
    parser.add_argument("--train-steps", type=int, default=600)
    parser.add_argument("--out", default="/tmp/fm-dense.safetensors")
    parser.add_argument("--attacks", default="pgd,apgd,minnorm,autoattack")
    args = parser.parse_args()
    start = time.perf_counter()
    model = train_dense(args.train_steps, 0)
    cpl_cert.save_checkpoint(model, args.out, dataset=cpl_cert.load_dataset("fashion-mnist").metadata(), training={"steps": args.train_steps})
    print(f"trained {args.train_steps} steps in {time.perf_counter() - start:.1f} s -> {args.out}")
    data = cpl_cert.load_dataset("fashion-mnist").subset(args.points)
    eps = [0.1, 0.25, 0.5, 1.0]
    cert = cpl_cert.certify(model, data, eps=eps, device="cpu")
    print(f"clean {cert.clean_accuracy:.3f} certified " + " ".join(f"{e}:{cert.certified_accuracy(e):.3f}" for e in eps))
    images = data.images.float() / 255
    for attack in args.attacks.split(","):
        t = time.perf_counter()
        suite = run_suite(model, images, cert.predictions, eps, attack=attack,
                          reference_float32=cert.predictions_float32, clean=exact_points(data.images))
        seconds = time.perf_counter() - t
        robust = [float((cert.correct & ~suite.broken(e)).double().mean()) for e in range(len(eps))]
        violations = find_violations(suite, cert)
        print(
            f"{attack:10s} {seconds:7.1f} s  {args.points / seconds:7.1f} points/s  robust "
            + " ".join(f"{e}:{r:.3f}" for e, r in zip(eps, robust, strict=True))
            + f"  violations {len(violations)}  rejected {suite.rejected}"
        )


if __name__ == "__main__":
    main()
