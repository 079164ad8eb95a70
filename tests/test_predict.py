"""``cpl-cert predict`` and ``cpl_cert.predict``: the same answers as ``certify`` on the same images,
from PNG files, folders and .npy arrays; every input that does not fit is refused in one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_frozen
from PIL import Image
from typer.testing import CliRunner

import cpl_cert
from cpl_cert.cli import app
from cpl_cert.data.registry import FASHION_CLASSES

runner = CliRunner()
SHIPPED = Path(__file__).resolve().parents[1] / "models" / "fmnist-cpl-xs.safetensors"
N = 48


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("CPL_CERT_OFFLINE", "1")
    monkeypatch.setenv("CPL_CERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CPL_CERT_DATA", raising=False)


@pytest.fixture(scope="module")
def test_images() -> tuple[torch.Tensor, torch.Tensor]:
    data = cpl_cert.load_dataset("fashion-mnist", split="test")
    return data.images[:N], data.labels[:N]


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory, test_images) -> Path:
    folder = tmp_path_factory.mktemp("pngs")
    for i, image in enumerate(test_images[0]):
        Image.fromarray(image[0].numpy(), mode="L").save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def rgb_checkpoint(tmp_path_factory) -> Path:
    model = make_frozen("cpl-tiny", input_shape=(3, 32, 32), num_classes=10, channels=4, conv_depth=1, dense_depth=1, conv_inner=4, dense_inner=16)
    path = tmp_path_factory.mktemp("rgb") / "rgb.safetensors"
    cpl_cert.save_checkpoint(
        model, path, dataset={"name": "cifar10", "input_shape": [3, 32, 32], "num_classes": 10, "classes": [f"c{i}" for i in range(10)]}
    )
    return path


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pngs_give_the_predictions_and_radii_of_certify(png_folder, test_images, tmp_path):
    images, labels = test_images
    out = tmp_path / "p.jsonl"
    result = runner.invoke(app, ["predict", str(SHIPPED), str(png_folder), "--eps", "0.25", "--json", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = read_lines(out)
    model, _ = cpl_cert.load_checkpoint(SHIPPED)
    reference = cpl_cert.certify(model, (images, labels), eps=[0.25], device="cpu", tight_radii=True)
    assert [row["input"] for row in rows] == [str(png_folder / f"{i:03d}.png") for i in range(N)]
    assert [row["class"] for row in rows] == reference.predictions.tolist()
    assert [row["radius"] for row in rows] == reference.radii.tolist()
    assert [row["name"] for row in rows] == [FASHION_CLASSES[k] for k in reference.predictions.tolist()]
    assert [row["certified"] for row in rows] == (reference.radii > 0.25).tolist()
    assert all(row["eps"] == 0.25 for row in rows)
    assert 0 < sum(row["certified"] for row in rows) < N  # both answers occur, so the column is tested
    assert f"certified at 0.25: {sum(row['certified'] for row in rows)} of {N}" in result.stdout
    assert "Ankle boot" in result.stdout and "wrote" in result.stdout


def test_library_predict_equals_certify(test_images):
    images, labels = test_images
    model, _ = cpl_cert.load_checkpoint(SHIPPED)
    got = cpl_cert.predict(model, images, eps="36/255", device="cpu", batch_size=16)
    reference = cpl_cert.certify(model, (images, labels), eps=[36 / 255], device="cpu", batch_size=16, tight_radii=True)
    assert torch.equal(got.predictions, reference.predictions) and torch.equal(got.radii, reference.radii)
    assert torch.equal(got.certified, reference.radii > 36 / 255) and got.eps.label == "36/255"
    single = cpl_cert.predict(model, images[0])  # one (C, H, W) image
    assert single.n == 1 and single.certified is None and int(single.predictions[0]) == int(reference.predictions[0])


def test_npy_arrays_in_every_layout(test_images, tmp_path):
    images, labels = test_images
    np.save(tmp_path / "batch.npy", images[:5].numpy())  # (N, C, H, W) uint8
    np.save(tmp_path / "one.npy", images[5, 0].numpy())  # (H, W) uint8
    np.save(tmp_path / "float.npy", images[6].numpy() / 255.0)  # (C, H, W) float in [0, 1]
    result = runner.invoke(app, ["predict", str(SHIPPED), *(str(tmp_path / f) for f in ("batch.npy", "one.npy", "float.npy")), "--json", "-"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]  # only JSON lines on stdout
    assert [row["input"] for row in rows] == [f"{tmp_path / 'batch.npy'}[{i}]" for i in range(5)] + [
        str(tmp_path / "one.npy"),
        str(tmp_path / "float.npy"),
    ]
    model, _ = cpl_cert.load_checkpoint(SHIPPED)
    reference = cpl_cert.certify(model, (images[:7], labels[:7]), eps=[1.0], device="cpu", tight_radii=True)
    assert [row["class"] for row in rows] == reference.predictions.tolist()
    # radii are rigorous lower bounds whose float32 rounding allowance depends a little on the batch
    assert [row["radius"] for row in rows] == pytest.approx(reference.radii.tolist(), rel=1e-4, abs=1e-7)
    assert all("certified" not in row for row in rows)


def test_resize_is_explicit(png_folder, tmp_path):
    big = tmp_path / "big.png"
    Image.open(png_folder / "000.png").resize((56, 56)).save(big)
    refused = runner.invoke(app, ["predict", str(SHIPPED), str(big)])
    assert refused.exit_code == 1 and "is 56x56 but the model takes 28x28 images; pass --resize" in refused.stderr
    resized = runner.invoke(app, ["predict", str(SHIPPED), str(big), "--resize", "--json", "-"])
    assert resized.exit_code == 0, resized.output
    assert json.loads(resized.stdout)["name"] == "Ankle boot"  # the first test image, 2x upsampled and back


def test_alpha_channel_is_refused_unless_converted(rgb_checkpoint, tmp_path):
    """An RGBA file is refused; with --convert an alpha channel opaque everywhere is dropped (the RGB file's
    answer), a transparent pixel is refused even then."""
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 4), dtype=np.uint8)
    pixels[..., 3] = 255
    Image.fromarray(pixels, mode="RGBA").save(tmp_path / "opaque.png")
    Image.fromarray(pixels[..., :3], mode="RGB").save(tmp_path / "rgb.png")
    refused = runner.invoke(app, ["predict", str(rgb_checkpoint), str(tmp_path / "opaque.png")])
    assert refused.exit_code == 1 and "opaque.png has an alpha channel (8-bit RGBA PNG)" in refused.stderr and "--convert" in refused.stderr
    ok = runner.invoke(app, ["predict", str(rgb_checkpoint), str(tmp_path / "opaque.png"), str(tmp_path / "rgb.png"), "--json", "-", "--convert"])
    assert ok.exit_code == 0, ok.output
    first, second = (json.loads(line) for line in ok.stdout.splitlines())
    assert first["radius"] == second["radius"] and first["class"] == second["class"] and first["name"] == f"c{first['class']}"
    pixels[0, 0, 3] = 10
    Image.fromarray(pixels, mode="RGBA").save(tmp_path / "clear.png")
    refused = runner.invoke(app, ["predict", str(rgb_checkpoint), str(tmp_path / "clear.png"), "--convert"])
    assert refused.exit_code == 1 and "transparent pixels" in refused.stderr


def bad_inputs(tmp_path: Path, png_folder: Path, rgb_checkpoint: Path) -> dict[str, tuple[Path, list[str], str]]:
    """name -> (model, arguments, phrase of the one-sentence error)."""
    grey_png = png_folder / "000.png"
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((28, 28, 3), np.uint8), mode="RGB").save(rgb)
    grey32 = tmp_path / "grey32.png"
    Image.fromarray(np.zeros((32, 32), np.uint8), mode="L").save(grey32)
    (tmp_path / "broken.png").write_text("not an image")
    (tmp_path / "cut.png").write_bytes(grey_png.read_bytes()[:60])
    (tmp_path / "empty").mkdir()
    (tmp_path / "only-text").mkdir()
    (tmp_path / "only-text" / "notes.txt").write_text("x")
    (tmp_path / "anim.gif").write_bytes(b"GIF89a")
    np.save(tmp_path / "big-floats.npy", np.full((1, 28, 28), 255.0))
    np.save(tmp_path / "nan.npy", np.full((1, 28, 28), np.nan))
    np.save(tmp_path / "ints.npy", np.zeros((1, 28, 28), np.int64))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "five-d.npy", np.zeros((1, 1, 1, 28, 28), np.uint8))
    np.save(tmp_path / "channels-last.npy", np.zeros((2, 32, 32, 3), np.uint8))
    np.save(tmp_path / "none.npy", np.zeros((0, 1, 28, 28), np.uint8))
    (tmp_path / "text.npy").write_text("nope")
    return {
        "RGB image, grey model": (SHIPPED, [str(rgb)], "is RGB (3 channels) but the model takes grey (1 channel) images"),
        "grey image, RGB model": (rgb_checkpoint, [str(grey32)], "is grey (1 channel) but the model takes RGB (3 channels) images"),
        "wrong size": (SHIPPED, [str(grey32)], "is 32x32 but the model takes 28x28 images; pass --resize"),
        "unreadable image": (SHIPPED, [str(tmp_path / "broken.png")], "is not a readable image"),
        "truncated image": (SHIPPED, [str(tmp_path / "cut.png")], "cut.png is a truncated PNG file"),
        "empty folder": (SHIPPED, [str(tmp_path / "empty")], "holds no .png, .jpg, .jpeg or .npy files"),
        "folder without images": (SHIPPED, [str(tmp_path / "only-text")], "holds no .png"),
        "other format": (SHIPPED, [str(tmp_path / "anim.gif")], "is not a .png, .jpg, .jpeg or .npy file"),
        "missing": (SHIPPED, [str(tmp_path / "nothing.png")], "does not exist"),
        "floats above 1": (SHIPPED, [str(tmp_path / "big-floats.npy")], "floats outside [0, 1]"),
        "NaN floats": (SHIPPED, [str(tmp_path / "nan.npy")], "NaN or infinite"),
        "int64 array": (SHIPPED, [str(tmp_path / "ints.npy")], "holds int64 values; give uint8"),
        "pickled array": (SHIPPED, [str(tmp_path / "objects.npy")], "Python objects"),
        "5-d array": (SHIPPED, [str(tmp_path / "five-d.npy")], "give (H, W), (C, H, W) or (N, C, H, W)"),
        "channels-last array": (rgb_checkpoint, [str(tmp_path / "channels-last.npy")], "looks channels-last"),
        "no images in array": (SHIPPED, [str(tmp_path / "none.npy")], "holds no images"),
        "not an array": (SHIPPED, [str(tmp_path / "text.npy")], "cannot be read"),
        "bad eps": (SHIPPED, [str(grey_png), "--eps", "-1"], "eps must be positive and finite, got '-1'"),
        "zero eps": (SHIPPED, [str(grey_png), "--eps", "0"], "eps must be positive"),
        "two eps": (SHIPPED, [str(grey_png), "--eps", "0.1,0.2"], "give one eps"),
        "bad batch size": (SHIPPED, [str(grey_png), "--batch-size", "0"], "--batch-size must be positive"),
        "json into a missing folder": (SHIPPED, [str(grey_png), "--json", str(tmp_path / "no" / "p.jsonl")], "does not exist"),
        "not a checkpoint": (tmp_path / "broken.png", [str(grey_png)], "not a"),
    }


def test_every_bad_input_exits_1_with_one_sentence(tmp_path, png_folder, rgb_checkpoint):
    for name, (model, args, phrase) in bad_inputs(tmp_path, png_folder, rgb_checkpoint).items():
        result = runner.invoke(app, ["predict", str(model), *args])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1, (name, result.output)
        assert len(lines) == 1 and lines[0].startswith("Error: ") and phrase in lines[0], (name, result.stderr)
        assert "Traceback" not in result.output and "CPL_CERT_DEBUG" not in result.stderr, name


def test_one_input_is_called_one_input(test_images, tmp_path):
    images, _ = test_images
    np.save(tmp_path / "one.npy", images[0].numpy())
    result = runner.invoke(app, ["predict", str(SHIPPED), str(tmp_path / "one.npy")])
    assert result.exit_code == 0, result.output
    assert "fmnist-cpl-xs.safetensors: 1 input, Lipschitz bound" in " ".join(result.stdout.split())
