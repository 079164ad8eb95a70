"""``cpl-cert import``: reference-code state_dicts convert to the same function, and bad files are refused.

The files are built by ``reference_net`` (a stand-in for the paper's code written from the layout in
issue 12); the imported model's logits are compared with that module's own forward pass.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from reference_net import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    PREFIX,
    Arch,
    layer_keys,
    power_sigma,
    reference_logits,
    reference_module,
    reference_sigmas,
)
from safetensors.torch import load_file
from typer.testing import CliRunner

import cpl_cert
from cpl_cert.cli import app

runner = CliRunner()

CASES = {
    # name: (architecture, dataset, --norm-input)
    "issue-size-truncation": (Arch(2, 8, 5, 2, 64, lln=False), "cifar10", False),
    "issue-size-lln-norm": (Arch(2, 8, 5, 2, 64, lln=True), "cifar10", True),
    "small-lln-cifar100": (Arch(1, 4, 3, 1, 32, lln=True, num_classes=100), "cifar100", False),
    "conv-only-norm-cifar100": (Arch(3, 6, 4, 0, 0, lln=False, num_classes=100), "cifar100", True),
    "dense-only": (Arch(0, 5, 0, 2, 16, lln=False), "cifar10", False),
}
NORMALIZATION = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}


def build_state(arch: Arch, seed: int = 0, cache_even: bool = True) -> dict[str, torch.Tensor]:
    """A reference state_dict; with ``cache_even`` every other layer has ``eval_sv_max`` set, to a
    30-iteration estimate (not what 100 iterations give), so the cached value must be the one used."""
    state = reference_module(arch, seed).state_dict()
    for index, (prefix, weight) in enumerate(layer_keys(arch)):
        if cache_even and index % 2 == 0:
            state[f"{prefix}.eval_sv_max"].fill_(float(power_sigma(state[f"{prefix}.{weight}"], state[f"{prefix}.pm.u"], iters=30)))
    return state


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state, path)
    return path


def run_import(source: Path, out: Path, dataset: str, lln: bool, norm: bool, steps: str | None = None):
    args = ["import", str(source), "--dataset", dataset, "--out", str(out)]
    args += ["--lln"] * lln + ["--norm-input"] * norm + (["--steps", steps] if steps else [])
    return runner.invoke(app, args)


def images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.rand((n, 3, 32, 32), generator=torch.Generator().manual_seed(seed))


def float32_step(sigma: torch.Tensor | float) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=torch.float32)
    return 2 / (s**2 + 1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_reference_steps_give_the_reference_function(case, tmp_path):
    arch, dataset, norm = CASES[case]
    state = build_state(arch)
    source = save(state, tmp_path / "best_model.pt")
    out = tmp_path / "model.safetensors"
    result = run_import(source, out, dataset, arch.lln, norm, "reference")
    assert result.exit_code == 0, result.output
    model, meta = cpl_cert.load_checkpoint(out)
    mean, std = NORMALIZATION[dataset]
    sigmas = reference_sigmas(state, arch)
    x = images()
    expected = reference_logits(state, arch, x, mean, std if norm else (1.0, 1.0, 1.0), [float32_step(s) for s in sigmas])
    with torch.no_grad():
        got = model(x)
    assert got.shape == (6, arch.num_classes)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
    # The provenance records the reference's own sigmas, where each came from, and its steps.
    p = meta["training"]["provenance"]
    assert p["steps"] == "reference" and p["source"] == "best_model.pt" and len(p["sha256"]) == 64
    assert p["reference_sigma_sources"] == ["eval_sv_max" if i % 2 == 0 else "power-iteration-100" for i in range(len(sigmas))]
    assert p["reference_sigmas"] == pytest.approx([float(s) for s in sigmas], rel=1e-5)
    assert p["architecture"] == {
        "depth": arch.depth,
        "num_channels": arch.num_channels,
        "conv_size": arch.conv_size,
        "depth_linear": arch.depth_linear,
        "n_features": arch.n_features,
        "lln": arch.lln,
        "num_classes": arch.num_classes,
    }
    assert meta["dataset"]["name"] == dataset and meta["dataset"]["num_classes"] == arch.num_classes
    assert len(meta["dataset"]["classes"]) == arch.num_classes
    assert p["reference_steps_body_bound"] == pytest.approx(cpl_cert.lipschitz_bounds(model).body_upper, rel=1e-12)


@pytest.mark.parametrize("case", ["issue-size-truncation", "issue-size-lln-norm", "small-lln-cifar100"])
def test_certified_steps_keep_the_weights_and_bound_every_layer(case, tmp_path):
    arch, dataset, norm = CASES[case]
    state = build_state(arch)
    out = tmp_path / "model.safetensors"
    result = run_import(save(state, tmp_path / "best_model.pt"), out, dataset, arch.lln, norm)
    assert result.exit_code == 0, result.output
    tensors = load_file(str(out))
    steps = [tensors[f"convs.{i}.step"] for i in range(arch.depth)] + [tensors[f"dense.{j}.step"] for j in range(arch.depth_linear)]
    # Same weights: the reference forward pass with the written steps gives the written model's logits.
    model, meta = cpl_cert.load_checkpoint(out)
    mean, std = NORMALIZATION[dataset]
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(state, arch, x, mean, std if norm else (1.0,) * 3, steps), rtol=0, atol=2e-6)
    # Each step is at most 2 / sigma^2 for the true norm: exact SVD (dense), converged float64 power iteration (conv, a lower bound).
    for step, (prefix, weight) in zip(steps, layer_keys(arch), strict=True):
        w = state[f"{prefix}.{weight}"].double()
        if w.dim() == 2:
            sigma = float(torch.linalg.matrix_norm(w, ord=2))
        else:
            sigma = float(power_sigma(w, torch.ones(1, w.shape[1], 32, 32, dtype=torch.float64), iters=3000))
        assert float(step) * sigma**2 <= 2.0 * (1 + 1e-9)
    p = meta["training"]["provenance"]
    assert p["steps"] == "certified" and p["written_steps"] == pytest.approx([float(s) for s in steps])
    assert p["written_body_bound"] == pytest.approx(1 / min(std) if norm else 1.0, rel=1e-7)  # std is held in float32
    assert "certified steps (written): certified body bound" in result.stdout


def test_reported_reference_bound_matches_closed_form(tmp_path):
    """Dense layers cached 5 % low (conv layers 50 % high, so bounded by 1): the body bound is the
    product of h s^2 - 1 over the dense layers, s their exact norm, times 1/min(std) with --norm-input."""
    arch = Arch(2, 4, 3, 3, 24, lln=False)
    state = reference_module(arch, seed=3).state_dict()
    expected = 1 / float(torch.tensor(CIFAR10_STD).min())  # the model holds std in float32
    for prefix, weight in layer_keys(arch):
        w = state[f"{prefix}.{weight}"]
        if w.dim() == 4:
            state[f"{prefix}.eval_sv_max"].fill_(1.5 * float(power_sigma(w, state[f"{prefix}.pm.u"], iters=500)))
        else:
            s = float(torch.linalg.matrix_norm(w.double(), ord=2))
            state[f"{prefix}.eval_sv_max"].fill_(0.95 * s)
            expected *= float(float32_step(state[f"{prefix}.eval_sv_max"][0])) * s * s - 1
    out = tmp_path / "model.safetensors"
    result = run_import(save(state, tmp_path / "ref.pt"), out, "cifar10", False, True)
    assert result.exit_code == 0, result.output
    p = cpl_cert.read_metadata(out)["training"]["provenance"]
    assert expected > 1.3 * 4  # the dense layers really are above 1 (1.105 each)
    assert p["reference_steps_body_bound"] == pytest.approx(expected, rel=1e-7)  # std is held in float32
    assert p["reference_assumed_body_bound"] == pytest.approx(1 / min(CIFAR10_STD))
    assert f"certified body bound {expected:.6g}" in " ".join(result.stdout.split())


@pytest.mark.parametrize("prefix", ["model.", ""])
def test_inner_state_dicts_without_the_wrappers_are_read(prefix, tmp_path):
    arch = Arch(1, 4, 3, 1, 16, lln=True)
    state = build_state(arch)
    stripped = {prefix + key[len(PREFIX) :]: value for key, value in state.items()}
    out = tmp_path / "m.safetensors"
    assert run_import(save(stripped, tmp_path / "m.pt"), out, "cifar10", True, False, "reference").exit_code == 0
    model, _ = cpl_cert.load_checkpoint(out)
    x = images(3)
    expected = reference_logits(state, arch, x, CIFAR10_MEAN, (1.0,) * 3, [float32_step(s) for s in reference_sigmas(state, arch)])
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=2e-6)


def test_info_shows_the_provenance(tmp_path):
    arch = Arch(1, 4, 3, 1, 16, lln=False)
    out = tmp_path / "m.safetensors"
    assert run_import(save(build_state(arch), tmp_path / "best_model.pt"), out, "cifar10", False, False).exit_code == 0
    shown = runner.invoke(app, ["info", str(out), "--json", "-"])
    assert shown.exit_code == 0, shown.output
    p = json.loads(shown.stdout)["training"]["provenance"]
    assert {"source", "sha256", "steps", "reference_sigmas", "reference_steps", "reference_steps_body_bound", "written_body_bound"} <= set(p)
    table = runner.invoke(app, ["info", str(out)])
    assert "provenance" in table.stdout and "reference_steps_body_bound" in table.stdout


# --- malformed files ------------------------------------------------------------------------------


class NotATensor:
    """A class only unpickling with code execution could rebuild."""


def _resave(state: dict[str, torch.Tensor], **changes: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``state`` with keys replaced (value) or removed (None), in both copies where the key has a twin."""
    state = dict(state)
    for key, value in changes.items():
        full = PREFIX + key
        twins = [full, full.replace("stable_block.", "base.1.").replace("layers_linear.", "base.2.")]
        for name in set(twins):
            if value is None:
                state.pop(name)
            else:
                state[name] = value
    return state


def malformed_files(tmp_path: Path) -> dict[str, tuple[Path, list[str], str]]:
    """name -> (file, extra options, a phrase the one-sentence error must contain)."""
    arch = Arch(2, 4, 3, 1, 16, lln=False)
    good = build_state(arch)
    lln_state = build_state(Arch(1, 4, 3, 1, 16, lln=True))
    files: dict[str, tuple[object, list[str], str]] = {
        "needs code": ({"weights": NotATensor()}, [], "holds Python objects"),
        "a whole module": (reference_module(arch), [], "holds Python objects"),
        "wrong kernel shape": (_resave(good, **{"stable_block.1.kernel": torch.zeros(3, 4, 5, 5)}), [], "has shape (3, 4, 5, 5)"),
        "wrong bias shape": (_resave(good, **{"layers_linear.1.bias": torch.zeros(17)}), [], "layers_linear.1.bias has shape (17,)"),
        "wrong vector size": (_resave(good, **{"stable_block.0.pm.u": torch.zeros(1, 4, 28, 28)}), [], "pm.u has shape"),
        "missing key": (_resave(good, **{"layers_linear.1.pm.u": None}), [], "lacks the tensor"),
        "missing duplicates": ({k: v for k, v in good.items() if ".base." not in k}, [], "lacks the tensor module.model.base."),
        "unexpected key": ({**good, "module.model.extra.weight": torch.zeros(2)}, [], "module.model.extra.weight"),
        "LLN head without --lln": (lln_state, [], "pass --lln"),
        "--lln without LLN head": (good, ["--lln"], "drop --lln"),
        "LLN rows for another dataset": (lln_state, ["--lln", "--dataset", "cifar100"], "predicts 10 classes"),
        "another architecture": (
            torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8, 10)).state_dict(),
            [],
            "not a reference CPL state_dict",
        ),
        "a tensor": (torch.zeros(3), [], "not a state_dict"),
        "NaN": (_resave(good, **{"stable_block.0.kernel": torch.full((3, 4, 3, 3), float("nan"))}), [], "NaN"),
        "copies differ": ({**good, PREFIX + "base.1.0.bias": good[PREFIX + "stable_block.0.bias"] + 1}, [], "differ"),
        "empty": ({}, [], "empty state_dict"),
        "two channels": (build_state(Arch(1, 2, 3, 1, 8, lln=False)), [], "fewer than the 3 input channels"),
    }
    out: dict[str, tuple[Path, list[str], str]] = {}
    for index, (name, (content, options, phrase)) in enumerate(files.items()):
        path = tmp_path / f"bad{index}.pt"
        torch.save(content, path)
        out[name] = (path, options, phrase)
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    (tmp_path / "zero.pt").write_bytes(b"")
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 4)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((tmp_path / "bad2.pt").read_bytes()[:300])
    safetensors = tmp_path / "ck.safetensors"
    cpl_cert.save_checkpoint(cpl_cert.freeze(cpl_cert.build_model("cpl-tiny", input_shape=(3, 32, 32), num_classes=10)), safetensors)
    for path in ("text.pt", "zero.pt", "noise.pt", "truncated.pt"):
        out[f"not a torch file: {path}"] = (tmp_path / path, [], "is not a torch.save file")
    out["a cpl-cert checkpoint"] = (safetensors, [], "is a safetensors file")
    out["missing file"] = (tmp_path / "nothing.pt", [], "does not exist")
    out["a folder"] = (tmp_path, [], "is a folder")
    out["not a reference dataset"] = (tmp_path / "bad0.pt", ["--dataset", "mnist"], "cifar10 or cifar100")
    out["bad --steps"] = (tmp_path / "bad0.pt", ["--steps", "exact"], "--steps must be certified or reference")
    return out


def test_every_malformed_file_exits_1_with_one_sentence(tmp_path):
    files = malformed_files(tmp_path)
    out = tmp_path / "out" / "m.safetensors"
    out.parent.mkdir()
    for name, (path, options, phrase) in files.items():
        dataset = ["--dataset", "cifar10"] if "--dataset" not in options else []
        result = runner.invoke(app, ["import", str(path), *dataset, "--out", str(out), *options])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1, (name, result.output)
        assert len(lines) == 1 and lines[0].startswith("Error: ") and phrase in lines[0], (name, result.stderr)
        assert "Traceback" not in result.output and "CPL_CERT_DEBUG" not in result.stderr, name
        assert not out.exists(), name


def test_pickles_are_never_executed(tmp_path):
    """A file whose unpickling would run code is refused without running it."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"x": Payload()}, tmp_path / "evil.pt")
    result = runner.invoke(app, ["import", str(tmp_path / "evil.pt"), "--dataset", "cifar10", "--out", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 1 and "holds Python objects" in result.stderr
    assert not marker.exists()


def test_reference_sigma_matches_the_reference_estimate():
    """The library's 100-iteration estimate is the reference's (explicit zero padding), to float32 rounding."""
    from cpl_cert.reference import reference_sigma

    g = torch.Generator().manual_seed(5)
    for weight, u in [
        (torch.randn(5, 8, 3, 3, generator=g), torch.randn(1, 8, 32, 32, generator=g)),
        (torch.randn(64, 512, generator=g), torch.randn(1, 512, generator=g)),
    ]:
        u = u / u.norm()
        assert reference_sigma(weight, u) == pytest.approx(float(power_sigma(weight, u)), rel=1e-5)
    assert math.isfinite(reference_sigma(torch.zeros(4, 8), torch.zeros(1, 8)))


def test_an_existing_output_is_not_overwritten_unless_asked(tmp_path):
    """Like train: an existing --out is refused before any work; --overwrite replaces it."""
    source = save(build_state(Arch(1, 4, 3, 1, 16, lln=False)), tmp_path / "best_model.pt")
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"precious")
    refused = run_import(source, out, "cifar10", False, False)
    assert refused.exit_code == 1 and refused.stdout == "", refused.output
    assert refused.stderr.strip() == f"Error: {out} already exists; pass --overwrite to replace it"
    assert out.read_bytes() == b"precious"
    replaced = runner.invoke(app, ["import", str(source), "--dataset", "cifar10", "--out", str(out), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert cpl_cert.load_checkpoint(out)[0].config.num_classes == 10
