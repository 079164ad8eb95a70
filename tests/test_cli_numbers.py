"""The command line's headline numbers are the library's: a library user gets them without ``cpl_cert.cli``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import cpl_cert
from cpl_cert.attacks import attack_dataset, summarize
from cpl_cert.cli import app
from cpl_cert.eps import parse_eps
from cpl_cert.lipschitz import assume_body_bound, data_lower_bound, lipschitz_bounds
from cpl_cert.loading import load_model_and_data

runner = CliRunner()
DATASET = {"name": "fashion-mnist", "input_shape": [1, 28, 28], "num_classes": 10}
POINTS = 24
EPS = "0.1,36/255"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small dense network whose steps are 20x too large, so that an assumed bound of 1 is violated."""
    torch.manual_seed(0)
    model = cpl_cert.build_model("cpl-tiny", input_shape=(1, 28, 28), num_classes=10, conv_depth=0, channels=1, dense_depth=2, dense_inner=64)
    model = cpl_cert.freeze(model)
    for layer in model.modules():
        if isinstance(layer, cpl_cert.CPLLinear):
            layer.step.mul_(20.0)
    path = tmp_path_factory.mktemp("numbers") / "dense.safetensors"
    cpl_cert.save_checkpoint(model, path, dataset=DATASET, training={})
    return path


def _cli_json(args: list[str], path: Path, codes: tuple[int, ...] = (0,)) -> dict:
    result = runner.invoke(app, [*args, "--json", str(path)])
    assert result.exit_code in codes, result.output
    return json.loads(path.read_text())


@pytest.mark.parametrize("attack, assumed", [("minnorm", None), ("apgd", 1.0)])
def test_attack_report_equals_the_library(checkpoint: Path, tmp_path: Path, attack: str, assumed: float | None):
    args = ["attack", str(checkpoint), "--attack", attack, "--limit", str(POINTS), "--eps", EPS, "--steps", "10", "--device", "cpu"]
    if assumed is not None:
        args += ["--assume-lipschitz", str(assumed)]
    report = _cli_json(args, tmp_path / "attack.json", codes=(0, 3))

    loaded = load_model_and_data(checkpoint, limit=POINTS)
    bounds = lipschitz_bounds(loaded.model)
    if assumed is not None:
        bounds = assume_body_bound(bounds, assumed)
    eps = parse_eps(EPS)
    cert = cpl_cert.certify(loaded.model, loaded.data, eps=eps, device="cpu", bounds=bounds)
    suite = attack_dataset(loaded.model, loaded.data, cert, eps, attack, steps=10)
    summary = summarize(cert, suite, eps, attack)

    assert report["results"] == summary.rows
    assert report["violations"] == summary.violated_points
    assert report["violation_details"] == [v.to_dict() for v in summary.violations]
    assert report["tightness"] == summary.tightness
    assert (summary.tightness is None) == (attack != "minnorm")
    assert bool(summary.violations) == (assumed is not None)  # the assumed bound is wrong, and the audit says so
    assert any(row["violations"] for row in summary.rows) == (assumed is not None)


def test_certify_report_equals_the_library(checkpoint: Path, tmp_path: Path):
    report = _cli_json(["certify", str(checkpoint), "--limit", str(POINTS), "--eps", EPS, "--device", "cpu"], tmp_path / "certify.json")

    loaded = load_model_and_data(checkpoint, limit=POINTS)
    result = cpl_cert.certify(loaded.model, loaded.data, eps=parse_eps(EPS), device="cpu")
    assert report["n"] == result.n == POINTS
    assert report["certified"] == result.certified
    assert (report["clean_accuracy"], report["clean_accuracy_float32"], report["clean_accuracy_any"]) == (
        result.clean_accuracy, result.clean_accuracy_float32, result.clean_accuracy_any,
    )
    assert report["lipschitz"]["upper"] == result.bounds.upper
    assert report["lipschitz"]["lower"] == data_lower_bound(loaded.model, loaded.data.images)
    assert report["lipschitz"]["lower_status"] == "computed"


def test_load_model_and_data_says_how_many_points_the_split_has(checkpoint: Path):
    loaded = load_model_and_data(checkpoint, limit=10**9)
    assert len(loaded.data) == loaded.available == 10_000
    assert len(load_model_and_data(checkpoint, limit=3).data) == 3
    with pytest.raises(cpl_cert.CplCertError, match="--limit"):
        load_model_and_data(checkpoint, limit=0)
