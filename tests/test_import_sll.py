"""``cpl-cert import --from sll``: SLL-code checkpoints of both layer versions convert to the same function, their real
bounds are reported, and bad files are refused with one sentence.

The files are built by ``sll_net`` (a stand-in for the SLL code written from the layouts in issue 19, checked once
against that code); the imported model's logits are compared with its own forward pass, and the reported bounds
with exact Jacobian norms of explicit matrices.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sll_net import PREFIX, SLLArch, layer_factor, layer_keys, sll_logits, sll_module, training_checkpoint
from typer.testing import CliRunner

import cpl_cert
from cpl_cert.cli import app
from cpl_cert.errors import CplCertError
from cpl_cert.sll_reference import import_sll

runner = CliRunner()

CASES = {
    # name: (architecture, dataset)
    "current": (SLLArch("current", 2, 2, 8, 5, 64), "cifar10"),
    "current-cifar100-dense-heavy": (SLLArch("current", 1, 3, 6, 4, 32, num_classes=100), "cifar100"),
    "current-tiny-imagenet": (SLLArch("current", 1, 1, 4, 3, 16, num_classes=200, size=64), "tiny-imagenet"),
    "earlier-lln": (SLLArch("earlier", 2, 2, 8, 5, 64), "cifar10"),
    "earlier-truncation": (SLLArch("earlier", 3, 1, 5, 3, 32, lln=False), "cifar10"),
    "earlier-dense-only-cifar100": (SLLArch("earlier", 0, 2, 3, 5, 16, num_classes=100), "cifar100"),
}


def save(checkpoint: object, path: Path) -> Path:
    torch.save(checkpoint, path)
    return path


def images(arch: SLLArch, n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, arch.size, arch.size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CASES))
def test_reference_mode_reproduces_the_forward_of_either_version(tmp_path, name):
    arch, dataset = CASES[name]
    checkpoint = training_checkpoint(arch, seed=len(name))
    imported = import_sll(save(checkpoint, tmp_path / "ckpt.pth"), dataset, steps="reference")
    assert imported.architecture.version == arch.version
    x = images(arch)
    with torch.no_grad():
        expected = sll_logits(checkpoint["model_state_dict"], arch, x)
        assert torch.allclose(imported.model(x), expected, atol=2e-6, rtol=0)
        certified = import_sll(tmp_path / "ckpt.pth", dataset, steps="certified")
        assert certified.provenance["written_body_bound"] == 1.0
        assert torch.allclose(certified.model(x), expected, atol=1e-4, rtol=0)  # the current formula, re-frozen


def exact_layer_bounds(model: cpl_cert.CPLNet) -> list[float]:
    """Each dense layer's Lipschitz constant from its explicit matrix and the rescaling it applies (attained with
    every unit active): ``max(1, 2 ||diag(sqrt t) W||^2 - 1)``."""
    out = []
    for layer in model.dense:
        a = layer.weight.detach().double() * layer.t.double().sqrt()[:, None]
        out.append(max(1.0, 2 * float(torch.linalg.matrix_norm(a, 2)) ** 2 - 1))
    return out


def test_the_earlier_dense_layers_epsilon_is_reported_as_a_bound_above_one(tmp_path):
    arch = SLLArch("earlier", 1, 2, 4, 3, 24)
    checkpoint = training_checkpoint(arch, seed=3, q_scale=3e-6)  # |q| ~ 1e-6: the epsilon inflates t
    imported = import_sll(save(checkpoint, tmp_path / "ckpt.pth"), "cifar10", steps="reference")
    state = checkpoint["model_state_dict"]
    for layer, (key, weight_name) in zip([*imported.model.convs, *imported.model.dense], layer_keys(arch), strict=True):
        factor = layer_factor(arch, state[f"{key}.{weight_name}"], state[f"{key}.q"])
        assert torch.allclose(layer.t.double(), factor / 2, rtol=1e-5)  # the file's own rescaling is what runs
    exact = exact_layer_bounds(imported.model)
    reported = imported.provenance["reference_layer_bounds"][arch.n_conv :]
    assert min(exact) > 1.05
    for e, r in zip(exact, reported, strict=True):
        assert e <= r <= e * (1 + 1e-7)  # attained for a dense layer: the certified bound is the real one
    body = imported.provenance["reference_body_bound"]
    assert body >= exact[0] * exact[1] * (1 - 1e-9)
    assert cpl_cert.lipschitz_bounds(imported.model).body_upper == body  # the written model certifies with it
    certified = import_sll(tmp_path / "ckpt.pth", "cifar10", steps="certified")
    assert certified.provenance["written_body_bound"] == 1.0
    assert max(high for _, high in certified.provenance["written_t_ratios"][arch.n_conv :]) < 1.0  # every t shrank


def test_the_current_version_is_1_lipschitz_up_to_its_float32_rescaling(tmp_path):
    arch, dataset = CASES["current"]
    imported = import_sll(save(training_checkpoint(arch, seed=5), tmp_path / "ckpt.pth"), dataset, steps="reference")
    assert imported.provenance["reference_body_bound"] <= 1.0 + 1e-6


@pytest.mark.parametrize("wrap", ["ddp", "normalized-model", "bare-network", "state-dict-only"])
def test_every_wrapper_of_the_trainer_is_read(tmp_path, wrap):
    arch, dataset = CASES["current"]
    checkpoint = training_checkpoint(arch, seed=6)
    state = checkpoint["model_state_dict"]
    strip = {"ddp": "", "normalized-model": "module.", "bare-network": PREFIX, "state-dict-only": ""}[wrap]
    stripped = {key[len(strip):]: value for key, value in state.items()}
    saved = stripped if wrap == "state-dict-only" else {**checkpoint, "model_state_dict": stripped}
    imported = import_sll(save(saved, tmp_path / "ckpt.pth"), dataset, steps="reference")
    x = images(arch)
    with torch.no_grad():
        assert torch.allclose(imported.model(x), sll_logits(state, arch, x), atol=2e-6, rtol=0)


def test_cli_reports_the_real_bound_and_writes_a_checkpoint_that_certifies_with_it(tmp_path):
    arch = SLLArch("earlier", 1, 1, 4, 3, 24)
    source = save(training_checkpoint(arch, seed=7, q_scale=3e-6), tmp_path / "model.ckpt-300.pth")
    out = tmp_path / "imported.safetensors"
    result = runner.invoke(app, ["import", str(source), "--from", "sll", "--dataset", "cifar10", "--steps", "reference", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "earlier layer version" in result.output and "not 1-Lipschitz" in result.output
    model, meta = cpl_cert.load_checkpoint(out)
    provenance = meta["training"]["provenance"]
    assert provenance["reference_body_bound"] > 1.01 and meta["config"]["layer"] == "sll"
    x = (images(arch, 6) * 255).round().to(torch.uint8)
    result = cpl_cert.certify(model, (x, None), eps=[0.1], device="cpu")
    assert result.bounds.body_upper == provenance["reference_body_bound"]
    listing = runner.invoke(app, ["lipschitz", str(out), "--samples", "0"])
    assert listing.exit_code == 0 and "sll-dense" in listing.output


def _checkpoint_with(arch: SLLArch, change) -> dict:
    checkpoint = training_checkpoint(arch, seed=8)
    change(checkpoint["model_state_dict"])
    return checkpoint


BAD = {
    "missing q": (lambda s: s.pop(f"{PREFIX}model.1.q"), "lacks the tensor module.model.model.1.q"),
    "extra tensor": (lambda s: s.__setitem__(f"{PREFIX}model.1.scale", torch.ones(1)), "fit neither"),
    "wrong bias shape": (lambda s: s.__setitem__(f"{PREFIX}model.1.bias", torch.zeros(5)), "has shape (5,)"),
    "nan": (lambda s: s[f"{PREFIX}model.5.weight"].fill_(float("nan")), "NaN"),
    "head for 100 classes": (lambda s: s.__setitem__(f"{PREFIX}model.7.weight", torch.ones(100, 512)), "check --dataset"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_give_one_sentence(tmp_path, case):
    change, message = BAD[case]
    source = save(_checkpoint_with(CASES["current"][0], change), tmp_path / "bad.pth")
    result = runner.invoke(app, ["import", str(source), "--from", "sll", "--dataset", "cifar10", "--out", str(tmp_path / "o.safetensors")])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o.safetensors").exists()


def test_other_refusals(tmp_path):
    arch = SLLArch("earlier", 1, 1, 4, 3, 24)
    checkpoint = training_checkpoint(arch, seed=9)
    checkpoint["model_state_dict"][f"{PREFIX}base.1.0.kernel"] = checkpoint["model_state_dict"][f"{PREFIX}base.1.0.kernel"] + 1
    with pytest.raises(CplCertError, match="should be the same tensor"):
        import_sll(save(checkpoint, tmp_path / "twin.pth"), "cifar10")
    with pytest.raises(CplCertError, match="beside model_state_dict"):
        import_sll(save({**training_checkpoint(arch), "scheduler": {"x": 1}}, tmp_path / "extra.pth"), "cifar10")
    with pytest.raises(CplCertError, match="not 'svhn'"):
        import_sll(tmp_path / "extra.pth", "svhn")
    torch.save(sll_module(arch), tmp_path / "pickled.pth")  # a whole module: needs code to load
    with pytest.raises(CplCertError, match="never runs code"):
        import_sll(tmp_path / "pickled.pth", "cifar10")
    args = ["import", str(tmp_path / "twin.pth"), "--dataset", "cifar10", "--out", str(tmp_path / "o.safetensors")]
    for extra, message in ((["--from", "sll", "--norm-input"], "subtracts the mean only"), (["--from", "aol"], "--from must be"),
                           ([], "use --from sll")):
        result = runner.invoke(app, [*args, *extra])
        assert result.exit_code == 1 and message in result.output, result.output
    result = runner.invoke(app, ["import", str(save(training_checkpoint(SLLArch("earlier", 1, 1, 4, 3, 24, lln=False)), tmp_path / "t.pth")),
                                 "--from", "sll", "--lln", "--dataset", "cifar10", "--out", str(tmp_path / "o.safetensors")])
    assert result.exit_code == 1 and "drop --lln" in result.output


def test_provenance_is_recorded(tmp_path):
    arch, dataset = CASES["earlier-truncation"]
    source = save(training_checkpoint(arch, seed=10), tmp_path / "ckpt.pth")
    out = tmp_path / "o.safetensors"
    assert runner.invoke(app, ["import", str(source), "--from", "sll", "--dataset", dataset, "--out", str(out)]).exit_code == 0
    _, meta = cpl_cert.load_checkpoint(out)
    provenance = meta["training"]["provenance"]
    assert provenance["architecture"]["version"] == "earlier" and provenance["steps"] == "certified"
    assert len(provenance["reference_layer_bounds"]) == arch.n_conv + arch.n_dense
    assert json.loads(json.dumps(provenance)) == provenance
    assert meta["dataset"]["mean"] == [0.4913, 0.4821, 0.4465] and meta["config"]["head"] == "truncation"
