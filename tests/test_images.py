"""The one image reader (``cpl_cert.images``, for ``predict`` and ``folder:PATH``): true values of every PNG.

Every PNG here is written byte by byte by tests/formats.py from the PNG specification (signature,
IHDR, PLTE, tRNS, IDAT with zlib, IEND, CRCs; all five filters; Adam7), so no decoder writes its own
test input. Expected values are the written samples divided by 2^depth - 1, in float64.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_frozen
from formats import png_bytes, png_chunk, sample
from typer.testing import CliRunner

import cpl_cert
from cpl_cert.cli import app
from cpl_cert.errors import CplCertError
from cpl_cert.images import read_image
from cpl_cert.inputs import load_inputs

runner = CliRunner()
CASES = [  # (colour type, bit depth, samples per pixel): every combination the specification allows
    *[(0, d, 1) for d in (1, 2, 4, 8, 16)], (2, 8, 3), (2, 16, 3), *[(3, d, 1) for d in (1, 2, 4, 8)],
    (4, 8, 2), (4, 16, 2), (6, 8, 4), (6, 16, 4),
]
HEIGHT, WIDTH = 9, 11  # every Adam7 pass is non-empty; rows of sub-byte samples end in padding bits


def palette_for(depth: int) -> list[tuple[int, int, int]]:
    """Distinct colours, one entry per index of ``depth`` bits."""
    return [((37 * i + 11) % 256, (101 * i + 7) % 256, (59 * i + 200) % 256) for i in range(1 << depth)]


def written(colour_type: int, depth: int, channels: int, n: int = 0) -> list[list[tuple[int, ...]]]:
    """The pixels a test writes: ``sample`` values, alpha (the last sample of types 4 and 6) opaque."""
    opaque = (1 << depth) - 1
    alpha = colour_type in (4, 6)
    return [
        [tuple(opaque if alpha and c == channels - 1 else sample(depth, n, c, r, col) for c in range(channels)) for col in range(WIDTH)]
        for r in range(HEIGHT)
    ]


def expected_values(pixels: list[list[tuple[int, ...]]], colour_type: int, depth: int) -> torch.Tensor:
    """(C, H, W) float64: each colour sample / (2^depth - 1); palette indices looked up (entries / 255); alpha left out."""
    if colour_type == 3:
        table = palette_for(depth)
        rows = [[[table[p[0]][c] / 255 for p in row] for row in pixels] for c in range(3)]
    else:
        colours = 3 if colour_type in (2, 6) else 1
        rows = [[[p[c] / ((1 << depth) - 1) for p in row] for row in pixels] for c in range(colours)]
    return torch.tensor(rows, dtype=torch.float64)


def as_values(image: torch.Tensor) -> torch.Tensor:
    """What a reader's tensor stands for: uint8 / 255, floats as they are (float64)."""
    return image.double() / 255 if image.dtype == torch.uint8 else image


def write(path: Path, colour_type: int, depth: int, channels: int, interlace: bool = False, **kwargs) -> list:
    pixels = written(colour_type, depth, channels)
    palette = palette_for(depth) if colour_type == 3 else None
    path.write_bytes(png_bytes(pixels, depth, colour_type, palette=palette, interlace=interlace, **kwargs))
    return pixels


@pytest.mark.parametrize("interlace", [False, True], ids=["plain", "adam7"])
@pytest.mark.parametrize("colour_type, depth, channels", CASES, ids=[f"type{t}-{d}bit" for t, d, _ in CASES])
def test_every_depth_and_colour_type_reads_at_its_true_values(tmp_path, colour_type, depth, channels, interlace):
    path = tmp_path / "image.png"
    pixels = write(path, colour_type, depth, channels, interlace)
    has_alpha = colour_type in (4, 6)
    image = read_image(path, convert=has_alpha)  # an opaque alpha channel is dropped only when asked
    assert image.dtype == (torch.float64 if depth == 16 else torch.uint8)
    assert torch.equal(as_values(image), expected_values(pixels, colour_type, depth))
    if has_alpha:
        with pytest.raises(CplCertError, match=rf"image.png has an alpha channel \({depth}-bit (grey\+alpha|RGBA) PNG\)"):
            read_image(path)


@pytest.mark.parametrize("kind", [0, 1, 2, 3, 4], ids=["none", "sub", "up", "average", "paeth"])
@pytest.mark.parametrize("colour_type, depth, channels", [(2, 8, 3), (0, 16, 1), (6, 16, 4), (0, 2, 1)])
def test_each_filter_alone(tmp_path, kind, colour_type, depth, channels):
    path = tmp_path / "image.png"
    pixels = write(path, colour_type, depth, channels, filters=(kind,))
    assert torch.equal(as_values(read_image(path, convert=True)), expected_values(pixels, colour_type, depth))


def test_sixteen_bit_values_keep_their_low_byte(tmp_path):
    """The values Pillow gets wrong: a 16-bit RGB pixel 0x0102 is 258 / 65535, not 1 / 255."""
    path = tmp_path / "rgb16.png"
    path.write_bytes(png_bytes([[(258, 65535, 0), (1, 256, 65280)]], 16, 2))
    image = read_image(path)
    assert image.tolist() == [[[258 / 65535, 1 / 65535]], [[1.0, 256 / 65535]], [[0.0, 65280 / 65535]]]


def test_tiny_interlaced_images_skip_empty_passes(tmp_path):
    for height, width in ((1, 1), (2, 3), (5, 1)):
        pixels = [[(sample(16, 0, 0, r, c),) for c in range(width)] for r in range(height)]
        (tmp_path / "tiny.png").write_bytes(png_bytes(pixels, 16, 0, interlace=True))
        assert torch.equal(read_image(tmp_path / "tiny.png"), expected_values(pixels, 0, 16))


def test_transparency_chunks_are_alpha(tmp_path):
    """tRNS on a palette or as a transparent grey / RGB key: refused, dropped with convert only when no pixel is transparent."""
    pixels = written(3, 2, 1)
    table = palette_for(2)
    used = {p[0] for row in pixels for p in row}
    rgb_key = b"".join(sample(16, 0, c, 0, 0).to_bytes(2, "big") for c in range(3))
    cases = {
        "palette-opaque.png": (png_bytes(pixels, 2, 3, palette=table, trns=bytes([255] * 4)), True),
        "palette-clear.png": (png_bytes(pixels, 2, 3, palette=table, trns=bytes([255, 0, 255, 255])), 1 not in used),
        "grey-key-unused.png": (png_bytes(written(0, 8, 1), 8, 0, trns=bytes([0, 7])), True),
        "grey-key-used.png": (png_bytes(written(0, 8, 1), 8, 0, trns=bytes([0, sample(8, 0, 0, 3, 4)])), False),
        "rgb16-key-used.png": (png_bytes(written(2, 16, 3), 16, 2, trns=rgb_key), False),
    }
    for name, (data, opaque) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CplCertError, match=f"{name} has an alpha channel"):
            read_image(tmp_path / name)
        if opaque:
            assert read_image(tmp_path / name, convert=True).shape[1:] == (HEIGHT, WIDTH)
        else:
            with pytest.raises(CplCertError, match=f"{name} has transparent pixels"):
                read_image(tmp_path / name, convert=True)


@pytest.mark.parametrize(
    "damage, phrase",
    [
        (lambda b: b[:-20], "truncated PNG file"),
        (lambda b: b[:16] + bytes([b[16] ^ 1]) + b[17:], "chunk IHDR fails its CRC check"),
        (lambda b: b[:8] + png_chunk(b"IHDR", bytes(8) + bytes([3, 2, 0, 0, 0])) + b[33:], "bit depth 3 with colour type 2"),
        (lambda b: b[:33] + png_chunk(b"IDAT", b"\x78\x9c not deflate") + png_chunk(b"IEND", b""), "cannot be decompressed"),
    ],
)
def test_damaged_png_is_one_sentence(tmp_path, damage, phrase):
    data = png_bytes(written(2, 8, 3), 8, 2)
    (tmp_path / "bad.png").write_bytes(damage(data))
    with pytest.raises(CplCertError, match=phrase):
        read_image(tmp_path / "bad.png")


def test_bad_filter_type_and_short_data(tmp_path):
    import zlib

    ihdr = png_chunk(b"IHDR", (2).to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes([8, 0, 0, 0, 0]))
    for raw, phrase in ((bytes([5, 1, 2]), "row filter type 5 does not exist"), (bytes([0, 1]), "holds 2 bytes, its header needs 3")):
        data = b"\x89PNG\r\n\x1a\n" + ihdr + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")
        (tmp_path / "bad.png").write_bytes(data)
        with pytest.raises(CplCertError, match=phrase):
            read_image(tmp_path / "bad.png")


def test_channels_are_converted_only_when_asked_and_only_losslessly(tmp_path):
    grey = tmp_path / "grey16.png"
    pixels = write(grey, 0, 16, 1)
    with pytest.raises(CplCertError, match=r"grey16.png is grey \(1 channel\) but the model takes RGB \(3 channels\) images; save it as RGB"):
        load_inputs([grey], (3, HEIGHT, WIDTH))
    rgb = load_inputs([grey], (3, HEIGHT, WIDTH), convert=True).images[0]
    assert torch.equal(rgb, expected_values(pixels, 0, 16).expand(3, -1, -1))
    equal = tmp_path / "equal.png"
    equal.write_bytes(png_bytes([[(v, v, v) for v in (0, 7, 255)]], 8, 2))
    with pytest.raises(CplCertError, match=r"equal.png is RGB \(3 channels\) but the model takes grey"):
        load_inputs([equal], (1, 1, 3))
    assert load_inputs([equal], (1, 1, 3), convert=True).images.tolist() == [[[[0, 7, 255]]]]
    colour = tmp_path / "colour.png"
    colour.write_bytes(png_bytes([[(0, 1, 0)]], 8, 2))
    with pytest.raises(CplCertError, match="its R, G and B differ, so convert it to grey yourself"):
        load_inputs([colour], (1, 1, 1), convert=True)


def test_jpeg_is_read_through_pillow_and_cmyk_is_refused(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((4, 5), 128, np.uint8), mode="L").save(tmp_path / "grey.jpg")
    image = read_image(tmp_path / "grey.jpg")
    assert image.dtype == torch.uint8 and image.shape == (1, 4, 5) and int((image.int() - 128).abs().max()) <= 2
    Image.new("CMYK", (4, 4)).save(tmp_path / "cmyk.jpg")
    with pytest.raises(CplCertError, match="cmyk.jpg is a JPEG of mode CMYK, which cpl-cert does not read"):
        read_image(tmp_path / "cmyk.jpg")


def _sixteen_bit_folder(root: Path) -> tuple[list[Path], list[list[list[int]]]]:
    """Two classes of 16-bit grey 4x4 PNGs whose first pixel is 100; returns the files and their samples."""
    files, samples = [], []
    for k, name in enumerate(("a", "b")):
        values = [[100 if (r, c) == (0, 0) else sample(16, k, 0, r, c) for c in range(4)] for r in range(4)]
        (root / name).mkdir(parents=True)
        files.append(root / name / "0.png")
        files[-1].write_bytes(png_bytes([[(v,) for v in row] for row in values], 16, 0, interlace=k == 1))
        samples.append(values)
    return files, samples


def test_predict_and_folder_datasets_read_the_same_values(tmp_path):
    files, samples = _sixteen_bit_folder(tmp_path / "data")
    truth = torch.tensor([[row] for row in samples], dtype=torch.float64).view(2, 1, 4, 4) / 65535
    folder = cpl_cert.load_dataset(f"folder:{tmp_path / 'data'}")
    predicted = load_inputs(files, (1, 4, 4)).images
    assert folder.images.dtype == predicted.dtype == torch.float64
    assert torch.equal(folder.images, truth) and torch.equal(predicted, truth)
    assert float(folder.images[0, 0, 0, 0]) == 100 / 65535


def test_predict_and_certify_on_a_folder_give_the_same_radii(tmp_path):
    """Through the command line: the radius predict prints for each file is the one certify --dataset folder:
    writes for it (the same input, the same certificate)."""
    files, _ = _sixteen_bit_folder(tmp_path / "data")
    model = make_frozen("cpl-tiny", input_shape=(1, 4, 4), num_classes=2, channels=4, conv_depth=1, dense_depth=1, dense_inner=8, pool=2)
    checkpoint = tmp_path / "m.safetensors"
    cpl_cert.save_checkpoint(model, checkpoint, dataset={"name": f"folder:{tmp_path / 'data'}"})
    predicted = runner.invoke(app, ["predict", str(checkpoint), *map(str, files), "--json", "-"])
    assert predicted.exit_code == 0, predicted.output
    certified = runner.invoke(app, ["certify", str(checkpoint), "--dataset", f"folder:{tmp_path / 'data'}", "--save-radii", str(tmp_path / "r.csv")])
    assert certified.exit_code == 0, certified.output
    with open(tmp_path / "r.csv") as handle:
        rows = list(csv.DictReader(handle))
    radii = [json.loads(line)["radius"] for line in predicted.stdout.splitlines()]
    assert radii == [float(row["radius"]) for row in rows] and len(radii) == 2


def test_folder_datasets_follow_the_same_policy(tmp_path):
    root = tmp_path / "mixed"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    grey = written(0, 8, 1)
    (root / "a" / "0.png").write_bytes(png_bytes(grey, 8, 0))
    (root / "b" / "0.png").write_bytes(png_bytes(written(2, 8, 3), 8, 2))
    with pytest.raises(CplCertError, match=r"b/0.png is RGB \(3 channels\) but .*a/0.png is grey \(1 channel\); save every image"):
        cpl_cert.load_dataset(f"folder:{root}")
    converted = cpl_cert.load_dataset(f"folder:{root}", convert=True)
    assert torch.equal(as_values(converted.images[0]), expected_values(grey, 0, 8).expand(3, -1, -1))
    (root / "b" / "0.png").write_bytes(png_bytes(written(6, 8, 4), 8, 6))
    (root / "a" / "0.png").write_bytes(png_bytes(written(2, 8, 3), 8, 2))
    with pytest.raises(CplCertError, match=r"b/0.png has an alpha channel \(8-bit RGBA PNG\).*convert=True"):
        cpl_cert.load_dataset(f"folder:{root}")
    assert cpl_cert.load_dataset(f"folder:{root}", convert=True).images.shape == (2, 3, HEIGHT, WIDTH)
