"""``cpl-cert import`` against the paper's reference code itself (not a re-implementation of it).

Builds networks with the reference repository's own ``model.py`` (MILES-PSL/Convex-Potential-Layer),
trains each a few Adam steps on random data in train mode (so weights and power-iteration vectors move),
evaluates it in eval mode (which caches ``eval_sv_max``, as the reference trainer does before saving),
saves ``state_dict()`` of ``nn.DataParallel(NormalizedModel(...))`` as its trainer does, imports the file
with ``cpl-cert import`` (both ``--steps`` modes) and prints the largest logit difference against the
reference code's own eval forward. Needs a checkout of the reference repository (no network here):

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/reference_roundtrip.py --reference-dir PATH/TO/Convex-Potential-Layer

The reference's ``util.py`` imports advertorch, pandas and autoattack at the top; none is used to build
or run the network, so empty stand-ins are registered when they are not installed.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import sys
import tempfile
import types
from pathlib import Path

import torch
from torch import nn

import cpl_cert
from cpl_cert.reference import REFERENCE_DATA, import_reference

# depth, depth_linear, conv_size, num_channels, n_features, lln, norm_input
CONFIGS = [(2, 2, 8, 8, 64, True, False), (2, 2, 8, 8, 64, False, True), (3, 1, 16, 12, 128, True, True), (1, 3, 4, 4, 32, False, False)]


def load_reference(reference_dir: Path) -> types.ModuleType:
    """The reference repository's ``model`` module (its ``layers`` and ``util`` come with it)."""
    missing = [name for name in ("advertorch", "pandas", "autoattack") if importlib.util.find_spec(name) is None]
    for name in missing + (["advertorch.attacks"] if "advertorch" in missing else []):
        stand_in = types.ModuleType(name)
        stand_in.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        stand_in.__path__ = []
        stand_in.L2PGDAttack = stand_in.AutoAttack = None
        sys.modules[name] = stand_in
    sys.path.insert(0, str(reference_dir))
    import model  # the reference's model.py

    return model


def reference_file(ref: types.ModuleType, config: tuple, path: Path, steps: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Train a reference network briefly, save it as the reference trainer does; its eval logits on random inputs."""
    depth, depth_linear, conv_size, channels, features, lln, norm_input = config
    data = REFERENCE_DATA["cifar10"]
    std = data.std if norm_input else (1.0, 1.0, 1.0)
    torch.manual_seed(0)
    net = ref.ConvexPotentialLayerNetwork(depth=depth, depth_linear=depth_linear, num_classes=10, conv_size=conv_size,
                                          num_channels=channels, n_features=features, use_lln=lln)
    model = nn.DataParallel(ref.NormalizedModel(net, data.mean, std), device_ids=[])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.rand(512, 3, 32, 32), torch.randint(0, 10, (512,))
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, 512, (64,))
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    test = torch.rand(64, 3, 32, 32)
    with torch.no_grad():
        logits = model(test)
    torch.save(model.state_dict(), path)
    return test, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-dir", type=Path, required=True)
    args = parser.parse_args()
    ref = load_reference(args.reference_dir)
    with tempfile.TemporaryDirectory() as tmp:
        for config in CONFIGS:
            path = Path(tmp) / "best_model.pt"
            test, logits = reference_file(ref, config, path)
            for steps in ("reference", "certified"):
                model = import_reference(path, "cifar10", norm_input=config[6], lln=config[5], steps=steps).model.eval()
                with torch.no_grad():
                    ours = model(test)
                diff = (ours - logits).abs().max().item()
                same = bool((ours.argmax(1) == logits.argmax(1)).all())
                body = cpl_cert.lipschitz_bounds(model).body_upper
                print(f"{str(config):45} --steps {steps:9}  max |logit difference| {diff:.2e}  (logits up to "
                      f"{logits.abs().max().item():.3g})  same predictions {same}  certified body bound {body:.6g}")


if __name__ == "__main__":
    main()
