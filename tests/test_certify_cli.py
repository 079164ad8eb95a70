"""``cpl-cert certify`` end to end on the shipped test split, and every bad input: exit 1, one sentence."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_frozen
from typer.testing import CliRunner

import cpl_cert
from cpl_cert.cli import app
from cpl_cert.data import to_float_images
from cpl_cert.models import float64_copy

runner = CliRunner()
SHIPPED = Path(__file__).resolve().parents[1] / "models" / "fmnist-cpl-xs.safetensors"
DESIGN_FIELDS = ("model", "sha256", "dataset", "split", "n", "lipschitz", "clean_accuracy", "certified", "device", "seconds", "images_per_second")


def save(model, path: Path, name: str = "fashion-mnist", shape=(1, 28, 28), classes: int = 10) -> Path:
    cpl_cert.save_checkpoint(model, path, dataset={"name": name, "input_shape": list(shape), "num_classes": classes}, training={})
    return path


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A small random frozen model for Fashion-MNIST (module-scoped: built once)."""
    model = make_frozen("cpl-tiny", channels=4, conv_depth=1, dense_depth=1, conv_inner=4, dense_inner=32)
    return save(model, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("CPL_CERT_OFFLINE", "1")
    monkeypatch.setenv("CPL_CERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CPL_CERT_DATA", raising=False)


def test_certify_end_to_end(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    args = ["certify", str(tiny_checkpoint), "--limit", "300", "--batch-size", "128", "--device", "cpu",
            "--json", str(out / "r.json"), "--save-radii", str(out / "r.csv")]
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    if has_mpl:
        args += ["--plot", str(out / "r.png")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for text in ("clean accuracy", "certified accuracy at eps = 0.1", "certified accuracy at eps = 1.0", "Lipschitz bound", "images / s"):
        assert text in result.stdout
    report = json.loads((out / "r.json").read_text())
    assert all(key in report for key in DESIGN_FIELDS)
    assert report["n"] == 300 and report["dataset"] == "fashion-mnist" and report["split"] == "test"
    assert [c["label"] for c in report["certified"]] == ["0.1", "0.25", "0.5", "1.0"]
    assert set(report["lipschitz"]) >= {"upper", "lower", "layers"} and report["lipschitz"]["upper"] == pytest.approx(1.0)
    assert 0 < report["lipschitz"]["lower"] <= report["lipschitz"]["upper"]
    assert all({"name", "kind", "step", "sigma_power", "sigma_upper", "bound"} <= set(layer) for layer in report["lipschitz"]["layers"])
    assert len(report["sha256"]) == 64 and report["device"] == "cpu" and report["images_per_second"] > 0
    rows = list(csv.DictReader((out / "r.csv").open()))
    header = ["index", "label", "prediction", "prediction_float32", "prediction_any", "margin", "radius", "radius_exact", "radius_float32",
              "radius_any"]
    assert len(rows) == 300 and list(rows[0]) == header
    assert [int(r["index"]) for r in rows] == list(range(300))
    # The report's numbers are the CSV's numbers, in every sense; "radius" holds for the first two.
    senses = (("", "prediction", "radius_exact"), ("_float32", "prediction_float32", "radius_float32"), ("_any", "prediction_any", "radius_any"))
    for sense, prediction, radius in senses:
        correct = [r["label"] == r[prediction] for r in rows]
        assert report["clean_accuracy" + sense] == pytest.approx(sum(correct) / 300)
        for entry in report["certified"]:
            expected = sum(c and float(r[radius]) > entry["eps"] for c, r in zip(correct, rows, strict=True)) / 300
            assert entry["accuracy" + sense] == pytest.approx(expected)
    assert all(float(r["radius"]) <= min(float(r["radius_exact"]), float(r["radius_float32"])) for r in rows)
    if has_mpl:
        assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == sorted(["r.json", "r.csv"] + (["r.png"] if has_mpl else []))


def test_certify_explicit_eps_and_dataset(tmp_path):
    """--eps with a fraction and --dataset: the radii are 36/255 exactly and 0.2, the points are the first 100 of
    the shipped split, and each reported accuracy is what a float64 recomputation gives in closed form: the
    shipped model's bound is 1 (frozen CPL layers, mean-only normalisation) and its head truncates, so a point is
    certified at eps when its float64 prediction is right and (f_top - f_second) / sqrt(2) > eps."""
    args = ["certify", str(SHIPPED), "--dataset", "fashion-mnist", "--eps", "36/255, 0.2", "--limit", "100", "--lower-bound-samples", "0",
            "--json", str(tmp_path / "r.json")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "eps = 36/255 (0.1412)" in result.stdout and "eps = 0.2 " in result.stdout and "shipped test split" in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["dataset"], report["n"], report["lipschitz"]["upper"]) == ("fashion-mnist", 100, 1.0)
    assert [(c["label"], c["eps"]) for c in report["certified"]] == [("36/255", 36 / 255), ("0.2", 0.2)]
    model, _ = cpl_cert.load_checkpoint(SHIPPED)
    data = cpl_cert.load_dataset("fashion-mnist").subset(100)
    with torch.no_grad():
        logits = float64_copy(model)(to_float_images(data.images).double())  # the float32 pixels certify reads
    top2 = logits.topk(2, dim=1)
    correct = top2.indices[:, 0] == data.labels
    radius = (top2.values[:, 0] - top2.values[:, 1]) / math.sqrt(2)
    assert report["clean_accuracy"] == float(correct.double().mean())
    for entry in report["certified"]:
        expected = float((correct & (radius > entry["eps"])).double().mean())
        assert entry["accuracy"] == expected and 0.5 < expected < 1  # neither vacuous nor trivial
        assert f"{100 * expected:.2f}%" in result.stdout.split(f"eps = {entry['label']}")[1].splitlines()[0]


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tiny = dict(channels=4, conv_depth=0, dense_depth=1, dense_inner=8)
    return {
        "shape": save(make_frozen("cpl-tiny", input_shape=(3, 32, 32), **tiny), root / "rgb.safetensors", "fashion-mnist", (3, 32, 32)),
        "classes": save(make_frozen("cpl-tiny", num_classes=5, **tiny), root / "five.safetensors", "fashion-mnist", (1, 28, 28), 5),
    }


def bad_cases(checkpoint: Path, mismatched: dict[str, Path], tmp: Path) -> dict[str, list[str]]:
    out = str(tmp / "out")
    model = str(checkpoint)
    return {
        "unknown dataset": [model, "--dataset", "imagenet", "--json", f"{out}/r.json"],
        "shape mismatch": [str(mismatched["shape"]), "--json", f"{out}/r.json"],
        "class mismatch": [str(mismatched["classes"]), "--save-radii", f"{out}/r.csv"],
        "malformed eps": [model, "--eps", "0.1,abc", "--json", f"{out}/r.json"],
        "negative eps": [model, "--eps", "-0.5", "--json", f"{out}/r.json"],
        "zero denominator": [model, "--eps", "1/0", "--json", f"{out}/r.json"],
        "limit 0": [model, "--limit", "0", "--json", f"{out}/r.json"],
        "json in a missing folder": [model, "--json", f"{out}/missing/r.json", "--save-radii", f"{out}/r.csv"],
        "csv path is a folder": [model, "--save-radii", out, "--json", f"{out}/r.json"],
        "cifar10 missing offline": [model, "--dataset", "cifar10", "--data-dir", str(tmp / "nothing"), "--json", f"{out}/r.json"],
        "missing checkpoint": [str(tmp / "none.safetensors"), "--json", f"{out}/r.json"],
        "unknown device": [model, "--device", "tpu", "--json", f"{out}/r.json"],
    }


CASES = ["unknown dataset", "shape mismatch", "class mismatch", "malformed eps", "negative eps", "zero denominator", "limit 0",
         "json in a missing folder", "csv path is a folder", "cifar10 missing offline", "missing checkpoint", "unknown device"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exit_1_one_sentence(case, tiny_checkpoint, mismatched, tmp_path):
    (tmp_path / "out").mkdir()
    args = bad_cases(tiny_checkpoint, mismatched, tmp_path)[case]
    result = runner.invoke(app, ["certify", *args])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output and "(set CPL_CERT_DEBUG" not in result.stderr
    assert list((tmp_path / "out").iterdir()) == []


def test_plot_without_matplotlib(tiny_checkpoint, tmp_path, monkeypatch):
    import cpl_cert.cli.plots as plots

    real = plots.importlib.util.find_spec
    monkeypatch.setattr(plots.importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    result = runner.invoke(app, ["certify", str(tiny_checkpoint), "--plot", str(tmp_path / "p.png"), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 1
    assert result.stderr.strip() == "Error: " + plots.INSTALL_HINT
    assert not (tmp_path / "p.png").exists() and not (tmp_path / "r.json").exists()


def test_certified_curve_steps():
    import torch

    from cpl_cert.cli.plots import certified_curve

    correct = torch.tensor([True, True, False, True])
    radii = torch.tensor([0.3, 0.1, 0.9, 0.0], dtype=torch.float64)
    r, acc = certified_curve(correct, radii)
    assert r.tolist() == [0.0, 0.0, 0.1, 0.3]
    # acc[i] is the certified accuracy just at r[i] (radius > r strictly)
    assert acc.tolist() == [0.5, 0.5, 0.25, 0.0]


def test_an_interrupted_lower_bound_keeps_the_certification(tiny_checkpoint, tmp_path, monkeypatch):
    """Ctrl-C during the empirical lower bound (the last stage): the table is already printed, the reports are
    written with the lower bound marked as not computed, and the exit code is the interrupt's."""
    import cpl_cert.cli.certify as certify_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(certify_cli, "data_lower_bound", interrupted)
    args = ["certify", str(tiny_checkpoint), "--limit", "40", "--device", "cpu",
            "--json", str(tmp_path / "r.json"), "--save-radii", str(tmp_path / "r.csv")]
    result = runner.invoke(app, args)
    assert result.exit_code == 130, result.output
    assert "clean accuracy" in result.stdout and "certified accuracy at eps = 0.25" in result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith("Error: interrupted during the empirical Lipschitz lower bound")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n"] == 40 and report["lipschitz"]["lower"] is None and report["lipschitz"]["lower_status"] == "interrupted"
    assert len((tmp_path / "r.csv").read_text().splitlines()) == 41


def test_the_lower_bound_comes_after_the_table_and_says_what_it_measured(tiny_checkpoint, tmp_path):
    result = runner.invoke(app, ["certify", str(tiny_checkpoint), "--limit", "20", "--device", "cpu", "--lower-bound-samples", "3",
                                 "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    table_end, lower = result.stdout.index("images / s"), result.stdout.index("Lipschitz lower bound")
    assert table_end < lower
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["lipschitz"]["lower_status"] == "computed" and 0 < report["lipschitz"]["lower"] <= 1
    skipped = runner.invoke(app, ["certify", str(tiny_checkpoint), "--limit", "20", "--device", "cpu", "--lower-bound-samples", "0",
                                  "--json", str(tmp_path / "s.json")])
    assert skipped.exit_code == 0 and "Lipschitz lower bound" not in skipped.stdout
    assert json.loads((tmp_path / "s.json").read_text())["lipschitz"]["lower_status"] == "skipped"


def test_the_csv_columns_are_the_ones_the_help_and_the_docs_list():
    """The --save-radii help and docs/certify.md name every column the file has, in order."""
    import typer.main

    from cpl_cert.cli.certify_report import CSV_HEADER

    option = next(p for p in typer.main.get_command(app).commands["certify"].params if p.name == "radii_path")
    assert ", ".join(CSV_HEADER) in option.help and len(CSV_HEADER) == 10
    docs = (Path(__file__).resolve().parents[1] / "docs" / "certify.md").read_text()
    assert f"10 columns: `{','.join(CSV_HEADER)}`" in docs
