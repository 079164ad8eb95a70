"""``cpl-cert attack`` end to end: a broken certificate is caught (exit 3), honest ones pass, misuse exits 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import cpl_cert
from cpl_cert.cli import app
from cpl_cert.models import cpl_layers

runner = CliRunner()
DATASET = {"name": "fashion-mnist", "input_shape": [1, 28, 28], "num_classes": 10}


def _dense_model(seed: int = 0):
    torch.manual_seed(seed)
    model = cpl_cert.build_model("cpl-tiny", input_shape=(1, 28, 28), num_classes=10, conv_depth=0, channels=1, dense_depth=2, dense_inner=64)
    return cpl_cert.freeze(model)


@pytest.fixture
def dense_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "dense.safetensors"
    cpl_cert.save_checkpoint(_dense_model(), path, dataset=DATASET, training={})
    return path


@pytest.fixture
def broken_checkpoint(tmp_path: Path) -> Path:
    """A frozen model whose steps are then made 20x too large: each layer is ~39-Lipschitz, not 1."""
    model = _dense_model()
    for _, layer in cpl_layers(model):
        layer.step.mul_(20.0)
    path = tmp_path / "broken.safetensors"
    cpl_cert.save_checkpoint(model, path, dataset=DATASET, training={})
    return path


def test_broken_certificate_exits_3_and_names_the_points(broken_checkpoint: Path, tmp_path: Path):
    report = tmp_path / "report.json"
    args = ["attack", str(broken_checkpoint), "--limit", "40", "--eps", "0.1", "--assume-lipschitz", "1", "--json", str(report)]
    result = runner.invoke(app, args)
    assert result.exit_code == 3, result.output
    data = json.loads(report.read_text())
    assert data["violations"], "the broken certificate must be caught"
    assert "contradicted" in result.output
    for index in data["violations"]:
        assert str(index) in result.output
    for detail in data["violation_details"]:
        assert detail["distance"] < detail["radius"]
        assert detail["index"] in data["violations"]
    # The same checkpoint with cpl-cert's own bound (which sees the large steps) is honest.
    honest = runner.invoke(app, ["attack", str(broken_checkpoint), "--limit", "40", "--eps", "0.1"])
    assert honest.exit_code == 0, honest.output


def test_minnorm_report_fields_and_plot(dense_checkpoint: Path, tmp_path: Path):
    report, plot = tmp_path / "r.json", tmp_path / "gap.png"
    pytest.importorskip("matplotlib")
    result = runner.invoke(
        app,
        ["attack", str(dense_checkpoint), "--attack", "minnorm", "--limit", "50", "--eps", "0.1,36/255", "--json", str(report), "--plot", str(plot)],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    for key in ("model", "n", "eps", "attacks", "clean_accuracy", "certified_accuracy", "robust_accuracy", "violations", "seconds"):
        assert key in data
    assert data["n"] == 50 and data["violations"] == []
    assert data["eps"] == pytest.approx([0.1, 36 / 255])
    for certified, robust in zip(data["certified_accuracy"], data["robust_accuracy"], strict=True):
        assert 0 <= certified <= robust <= data["clean_accuracy"] <= 1
    for certified, robust in zip(data["certified_accuracy_float32"], data["robust_accuracy_float32"], strict=True):
        assert 0 <= certified <= robust <= data["clean_accuracy_float32"] <= 1
    assert data["tightness"]["points"] > 0 and data["tightness"]["max"] <= 1.0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "extra, phrase",
    [
        (["--limit", "0"], "--limit"),
        (["--limit", "-5"], "--limit"),
        (["--eps", "abc"], "eps"),
        (["--eps", "-0.1"], "eps"),
        (["--eps", ""], "eps"),
        (["--attack", "fgsm"], "unknown attack"),
        (["--engine", "foolbox"], "unknown engine"),
        (["--engine", "torchattacks"], "unknown engine"),
        (["--attack", "square"], "--engine autoattack"),
        (["--attack", "fab"], "--engine autoattack"),
        (["--engine", "autoattack", "--attack", "minnorm"], "--engine native for minnorm"),
        (["--engine", "autoattack", "--attack", "pgd"], "--engine native for pgd"),
        (["--engine", "autoattack", "--steps", "10"], "--steps"),
        (["--steps", "0"], "--steps"),
        (["--batch-size", "0"], "--batch-size"),
        (["--assume-lipschitz", "0"], "--assume-lipschitz"),
        (["--assume-lipschitz", "inf"], "--assume-lipschitz"),
        (["--attack", "pgd", "--plot", "x.png"], "--plot needs"),
    ],
)
def test_misuse_exits_1_with_one_sentence(dense_checkpoint: Path, extra, phrase):
    result = runner.invoke(app, ["attack", str(dense_checkpoint), *extra])
    assert result.exit_code == 1, result.output
    assert phrase in result.output
    assert "Traceback" not in result.output
    assert result.output.strip().startswith("Error:")


def test_the_violation_table_has_one_row_per_point_and_counts_points(broken_checkpoint: Path, tmp_path: Path):
    """A point can violate its certificates in several senses: the table counts it once, on one row, as do the error
    line and the JSON's list of violated test points (``violation_details`` keeps one entry per sense)."""
    report = tmp_path / "report.json"
    args = ["attack", str(broken_checkpoint), "--limit", "20", "--eps", "0.1", "--assume-lipschitz", "1", "--json", str(report)]
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 3, result.output
    data = json.loads(report.read_text())
    points = sorted({detail["index"] for detail in data["violation_details"]})
    assert len(data["violation_details"]) > len(points)  # some point is violated in more than one sense
    assert data["violations"] == points
    assert f"CERTIFICATE VIOLATIONS ({len(points)} points" in result.stdout
    cells = [line.split("│")[1].strip() for line in result.stdout.splitlines() if line.startswith("│")]
    assert [cell for cell in cells if cell.isdigit()] == [str(i) for i in points]
    assert f"of {len(points)} test points" in result.stderr


def test_a_long_run_says_how_long_it_may_take_before_it_starts(dense_checkpoint: Path, monkeypatch):
    """Past a few minutes (here: any length), the command says up front how long the attacks may take, and how to
    take a first look sooner; a short run says nothing."""
    import cpl_cert.cli.attack as attack_cli

    args = ["attack", str(dense_checkpoint), "--limit", "30", "--eps", "0.1", "--steps", "5", "--device", "cpu"]
    quiet = runner.invoke(app, args)
    assert quiet.exit_code == 0 and "may take" not in quiet.stderr
    monkeypatch.setattr(attack_cli, "LONG_RUN_SECONDS", 0.0)
    long = runner.invoke(app, args)
    assert long.exit_code == 0, long.output
    note = next(line for line in long.stderr.splitlines() if "may take" in line)
    assert note.startswith("Note: the attacks (apgd, 30 points, 1 radius) may take up to about ") and "--limit" in note
