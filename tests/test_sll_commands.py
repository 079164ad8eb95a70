"""Every command works on an SLL checkpoint as on a CPL one: info, lipschitz, certify, attack, predict, export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import cpl_cert
from cpl_cert.cli import app

runner = CliRunner()
TINY_SLL = {"channels": 8, "conv_depth": 2, "dense_depth": 2, "conv_inner": 8, "dense_inner": 64, "pool": 4, "layer": "sll"}


@pytest.fixture(scope="module")
def sll_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = cpl_cert.build_model(TINY_SLL, input_shape=(1, 28, 28), num_classes=10, head="lln", mean=(0.286,))
    path = tmp_path_factory.mktemp("sll") / "sll.safetensors"
    dataset = cpl_cert.load_dataset("fashion-mnist")
    meta = {"name": "fashion-mnist", "input_shape": [1, 28, 28], "num_classes": 10, "classes": list(dataset.classes)}
    cpl_cert.save_checkpoint(model, path, dataset=meta)
    return path


def test_info_lipschitz_certify(sll_checkpoint, tmp_path):
    info = runner.invoke(app, ["info", str(sll_checkpoint)])
    assert info.exit_code == 0 and "sll" in info.output
    listing = runner.invoke(app, ["lipschitz", str(sll_checkpoint), "--samples", "4"])
    assert listing.exit_code == 0 and "sll-conv" in listing.output and "sll-dense" in listing.output
    report = tmp_path / "cert.json"
    result = runner.invoke(app, ["certify", str(sll_checkpoint), "--limit", "50", "--json", str(report), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["lipschitz"]["body_upper"] == 1.0
    assert [row["kind"] for row in data["lipschitz"]["layers"]].count("sll-dense") == 2
    assert all(entry["accuracy_float32"] <= entry["accuracy"] for entry in data["certified"])


def test_attack_finds_no_violation(sll_checkpoint):
    result = runner.invoke(app, ["attack", str(sll_checkpoint), "--attack", "pgd", "--limit", "20", "--steps", "20", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "no certificate violated" in result.output


def test_predict_gives_certify_radii(sll_checkpoint, tmp_path):
    dataset = cpl_cert.load_dataset("fashion-mnist")
    np.save(tmp_path / "x.npy", dataset.images[:6].numpy())
    result = runner.invoke(app, ["predict", str(sll_checkpoint), str(tmp_path / "x.npy"), "--json", "-", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    radii = [json.loads(line)["radius"] for line in result.output.strip().splitlines()]
    model, _ = cpl_cert.load_checkpoint(sll_checkpoint)
    expected = cpl_cert.certify(model, (dataset.images[:6], dataset.labels[:6]), device="cpu", tight_radii=True).radii
    assert np.allclose(radii, expected.numpy(), rtol=1e-6, atol=1e-9)


def test_export_runs_in_onnxruntime(sll_checkpoint, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    result = runner.invoke(app, ["export", str(sll_checkpoint), "--onnx", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    from cpl_cert.export import onnx_logits

    model, _ = cpl_cert.load_checkpoint(sll_checkpoint)
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(onnx_logits(tmp_path / "m.onnx", x), model(x), atol=1e-5)
