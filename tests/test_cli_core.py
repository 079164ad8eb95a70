"""`cpl-cert lipschitz`, `cpl-cert info` and help, end to end."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from references import all_active_jacobian_norm
from typer.testing import CliRunner

import cpl_cert
from cpl_cert.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def test_lipschitz_table_and_json(tmp_path, tiny_checkpoint):
    out = tmp_path / "bounds.json"
    result = runner.invoke(app, ["lipschitz", str(tiny_checkpoint), "--json", str(out), "--samples", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "convs.0" in result.output and "dense.1" in result.output
    assert "network upper bound" in result.output and "lower bound" in result.output
    report = json.loads(out.read_text())
    assert report["upper"] == 1.0 and 0 < report["lower"] <= 1.0 + 1e-5
    kinds = [layer["kind"] for layer in report["layers"]]
    assert kinds.count("cpl-conv") == 2 and kinds.count("cpl-dense") == 2
    for layer in report["layers"]:
        assert set(layer) == {"name", "kind", "step", "sigma_power", "sigma_upper", "bound"}


def test_lipschitz_flags_a_broken_model(tmp_path):
    """Weights scaled by 1.1 after freezing: the layer's exact worst case (all units active, an SVD of W) is
    h (1.1 s)^2 - 1 > 1. The reported layer bound must be at least that and tight (dense layers are certified
    to float64 rounding), the network bound at least the product of the exact layer bounds, and stderr must
    say the network is not 1-Lipschitz; the intact model draws no such warning."""
    torch.manual_seed(0)
    model = cpl_cert.freeze(cpl_cert.build_model("cpl-tiny", input_shape=(1, 12, 12), num_classes=3))
    cpl_cert.save_checkpoint(model, tmp_path / "intact.safetensors")
    with torch.no_grad():
        model.dense[0].weight.mul_(1.1)
    cpl_cert.save_checkpoint(model, tmp_path / "scaled.safetensors")
    exact = {name: all_active_jacobian_norm(layer) for name, layer in cpl_cert.models.cpl_layers(model)}
    assert exact["dense.0"] > 1.3 and all(value <= 1 + 1e-9 for name, value in exact.items() if name != "dense.0")
    out = tmp_path / "b.json"
    result = runner.invoke(app, ["lipschitz", str(tmp_path / "scaled.safetensors"), "--json", str(out), "--samples", "0"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = {row["name"]: row for row in report["layers"]}
    assert exact["dense.0"] <= rows["dense.0"]["bound"] <= exact["dense.0"] * (1 + 1e-9)
    assert report["upper"] >= math.prod(exact.values()) and report["body_upper"] == pytest.approx(report["upper"])
    warning = " ".join(result.stderr.split())
    assert f"Warning: scaled.safetensors is not 1-Lipschitz (certified bound of the layers before the head {report['body_upper']:.6g})" in warning
    intact = runner.invoke(app, ["lipschitz", str(tmp_path / "intact.safetensors"), "--samples", "0"])
    assert intact.exit_code == 0 and "not 1-Lipschitz" not in intact.stderr


def test_info_prints_metadata(tiny_checkpoint, tmp_path):
    result = runner.invoke(app, ["info", str(tiny_checkpoint), "--json", "-"])
    assert result.exit_code == 0, result.output
    meta = json.loads(result.stdout)
    written = runner.invoke(app, ["info", str(tiny_checkpoint), "--json", str(tmp_path / "meta.json")])
    assert written.exit_code == 0 and json.loads((tmp_path / "meta.json").read_text()) == meta
    assert meta["format"] == "cpl-cert/1" and meta["config"]["preset"] == "cpl-tiny"
    c = meta["config"]  # cpl-tiny on 1x28x28: conv (inner, channels, 3, 3) + bias, dense (inner, features) + bias
    features = c["channels"] * (28 // c["pool"]) ** 2
    conv = c["conv_depth"] * (c["conv_inner"] * c["channels"] * 9 + c["conv_inner"])
    dense = c["dense_depth"] * (c["dense_inner"] * features + c["dense_inner"])
    assert meta["parameters"] == conv + dense == 101_776
    table = runner.invoke(app, ["info", str(tiny_checkpoint)])
    assert table.exit_code == 0 and "fashion-mnist" in table.output


def test_unwritable_json_path_fails_before_work(tmp_path, tiny_checkpoint):
    result = runner.invoke(app, ["lipschitz", str(tiny_checkpoint), "--json", str(tmp_path / "no" / "such" / "x.json")])
    assert result.exit_code == 1 and "does not exist" in result.stderr


COMMANDS = ("train", "certify", "attack", "lipschitz", "info", "import", "predict", "export")


def test_help_pages_read_cleanly():
    """No ``<bool>`` placeholder for flags, arguments by metavar (not ``{model_path}``), every command takes --threads."""
    for args in (["--help"], *([command, "--help"] for command in COMMANDS)):
        result = runner.invoke(app, args, terminal_width=100)
        assert result.exit_code == 0 and "Usage" in result.output, args
        assert "<bool>" not in result.output and "{" not in result.output, result.output
        if args[0] != "--help":
            assert "--threads" in result.output, args
    usage = runner.invoke(app, ["certify", "--help"]).output
    assert "Usage: cpl-cert certify [OPTIONS] MODEL" in " ".join(usage.split())


def test_help_paragraphs_are_reflowed():
    """A docstring's hard line breaks are not kept: each paragraph is one line that the terminal wraps."""
    import typer.main

    from cpl_cert.cli.helptext import reflow

    group = typer.main.get_command(app)
    for name in COMMANDS:
        for paragraph in group.commands[name].help.split("\n\n"):
            assert "\n" not in paragraph, (name, paragraph)
    assert reflow("First line\n    goes on.\n\n    Second\n    paragraph.") == "First line goes on.\n\nSecond paragraph."


def test_help_and_console_entry():
    for args in (["--help"], ["lipschitz", "--help"], ["info", "--help"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and "Usage" in result.output
    proc = subprocess.run([sys.executable, "-m", "cpl_cert", "--version"], capture_output=True, text=True, check=False)
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert proc.returncode == 0 and proc.stdout == f"cpl-cert {version}\n"
    usage = runner.invoke(app, ["lipschitz"])
    assert usage.exit_code == 2


def test_a_closed_pipe_is_not_an_error(tmp_path):
    """``cpl-cert ... | head -1``: the reader has gone; the command still does its work (here: writes its JSON)
    and exits 0 with nothing on stderr. The read end is closed before the command writes, so every write fails."""
    model = ROOT / "models" / "fmnist-cpl-xs.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for args in (["info", str(model), "--json", str(tmp_path / "meta.json")], ["info", str(model), "--json", "-"]):
        proc = subprocess.Popen([sys.executable, "-m", "cpl_cert", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()
        stderr = proc.stderr.read().decode()
        assert (proc.wait(), stderr) == (0, ""), args
    assert json.loads((tmp_path / "meta.json").read_text())["format"] == "cpl-cert/1"
