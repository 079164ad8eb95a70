"""``cpl-cert import --from sll`` against the SLL code itself (araujoalexandre/Lipschitz-SLL-Networks), both versions.

Builds networks with the SLL repository's own ``core/models/model.py`` (a checkout of its current version, and one
of the commit before "fix numerical stability & Lipschitzness", e.g. ``git worktree add ../sll-earlier 1abe5e1^``),
wraps them as its trainer does (``DataParallel(NormalizedModel(LipschitzNetwork))``), trains each a few Adam steps
on random data, saves ``{'epoch', 'global_step', 'model_state_dict', 'optimizer_state_dict'}`` as its trainer does,
imports the file (both ``--steps`` modes) and prints the largest logit difference against the SLL code's own eval
forward, with the certified body bound of each. Optionally the dense layers' ``q`` are scaled after training, which
shows the earlier version's epsilon. Run (no network needed):

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/sll_roundtrip.py --current-dir PATH/TO/SLL --earlier-dir PATH/TO/sll-earlier
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import types
from pathlib import Path

import torch

from cpl_cert.sll_reference import SLL_DATA, import_sll

# version, n_conv, n_dense, w, conv_inner, dense_inner, dataset, last layer (earlier version), dense q scale
CONFIGS = [
    ("current", 2, 2, 8, 5, 64, "cifar10", "lln", 1.0),
    ("current", 3, 1, 12, 7, 128, "cifar100", "lln", 1.0),
    ("current", 1, 2, 4, 5, 32, "tiny-imagenet", "lln", 1.0),
    ("earlier", 2, 2, 8, 5, 64, "cifar10", "lln", 1.0),
    ("earlier", 3, 1, 12, 7, 128, "cifar10", "pooling_linear", 1.0),
    ("earlier", 2, 2, 8, 5, 64, "cifar10", "lln", 3e-6),
]


def load_sll_classes(folder: Path) -> types.SimpleNamespace:
    """``NormalizedModel`` and ``LipschitzNetwork`` of one checkout (its ``core`` package is unloaded afterwards, so
    the other version's can be loaded under the same name)."""
    sys.path.insert(0, str(folder))
    try:
        from core.models.model import LipschitzNetwork, NormalizedModel
    finally:
        sys.path.remove(str(folder))
        for name in [name for name in sys.modules if name == "core" or name.startswith("core.")]:
            del sys.modules[name]
    return types.SimpleNamespace(LipschitzNetwork=LipschitzNetwork, NormalizedModel=NormalizedModel)


def sll_file(classes: types.SimpleNamespace, config: tuple, path: Path, steps: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Train an SLL network briefly and save it as its trainer does; its eval logits on random inputs."""
    version, n_conv, n_dense, w, conv_inner, dense_inner, dataset, last_layer, q_scale = config
    data = SLL_DATA[dataset]
    c = types.SimpleNamespace(dataset=dataset)
    if version == "current":
        c.n_conv, c.n_dense, c.w, c.conv_inner_dim, c.dense_inner_dim = n_conv, n_dense, w, conv_inner, dense_inner
    else:
        c.depth, c.num_channels, c.depth_linear, c.n_features, c.conv_size, c.last_layer = n_conv, w, n_dense, dense_inner, conv_inner, last_layer
    torch.manual_seed(0)
    model = torch.nn.DataParallel(classes.NormalizedModel(classes.LipschitzNetwork(c, data.num_classes), data.mean, (1.0, 1.0, 1.0)))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.5, 0.9))
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.rand(16, 3, data.size, data.size, generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, data.num_classes, (16,), generator=g))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():  # the dense layers' q (the conv layers have a kernel)
        for module in model.modules():
            if isinstance(getattr(module, "q", None), torch.Tensor) and not hasattr(module, "kernel"):
                module.q.mul_(q_scale)
    model.eval()
    probe = torch.rand(8, 3, data.size, data.size, generator=g)
    with torch.no_grad():
        logits = model(probe)
    state = {"epoch": 1, "global_step": steps, "model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict()}
    torch.save(state, path)
    return probe, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--current-dir", type=Path, required=True, help="a checkout of the SLL repository (current version)")
    parser.add_argument("--earlier-dir", type=Path, required=True, help="a checkout of its commit before the fix (1abe5e1^)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    classes = {"current": load_sll_classes(args.current_dir), "earlier": load_sll_classes(args.earlier_dir)}
    with tempfile.TemporaryDirectory() as folder:
        for config in CONFIGS:
            path = Path(folder) / "model.ckpt-30.pth"
            probe, expected = sll_file(classes[config[0]], config, path)
            for steps in ("reference", "certified"):
                imported = import_sll(path, config[6], steps=steps)
                with torch.no_grad():
                    gap = float((imported.model(probe) - expected).abs().max())
                print(
                    f"{str(config):<58} --steps {steps:<9}  max |logit difference| {gap:.2e}  (logits up to {float(expected.abs().max()):.3g})"
                    f"  certified body bound {imported.provenance['written_body_bound']:.8g}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
