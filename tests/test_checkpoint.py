"""Checkpoints: exact round trips, and one clear sentence (exit 1, no traceback) for every bad file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import make_frozen
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import cpl_cert
from cpl_cert.checkpoint import FORMAT
from cpl_cert.cli import app

runner = CliRunner()


def test_save_load_gives_bit_identical_logits(tmp_path, tiny_model):
    path = tmp_path / "m.safetensors"
    cpl_cert.save_checkpoint(tiny_model, path, dataset={"name": "fashion-mnist"}, training={"epochs": 3})
    loaded, meta = cpl_cert.load_checkpoint(path)
    x = torch.rand(7, 1, 28, 28)
    assert torch.equal(tiny_model(x), loaded(x))
    assert meta["format"] == FORMAT and meta["dataset"]["name"] == "fashion-mnist" and meta["training"]["epochs"] == 3
    assert loaded.config == tiny_model.config
    assert not loaded.training and cpl_cert.is_frozen(loaded)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"], "no temporary file may be left behind"


def test_save_freezes_an_unfrozen_model(tmp_path):
    torch.manual_seed(0)
    model = cpl_cert.build_model("cpl-tiny", input_shape=(1, 12, 12), num_classes=3)
    cpl_cert.save_checkpoint(model, tmp_path / "m.safetensors")
    loaded, _ = cpl_cert.load_checkpoint(tmp_path / "m.safetensors")
    assert cpl_cert.lipschitz_bounds(loaded).upper == 1.0


def test_lln_round_trip(tmp_path):
    model = make_frozen("cpl-tiny", input_shape=(3, 8, 8), num_classes=4, head="lln", std=(0.2, 0.3, 0.4))
    cpl_cert.save_checkpoint(model, tmp_path / "m.safetensors")
    loaded, _ = cpl_cert.load_checkpoint(tmp_path / "m.safetensors")
    x = torch.rand(3, 3, 8, 8)
    assert torch.equal(model(x), loaded(x))


def _rewrite(path: Path, out: Path, tensors=None, metadata=None) -> Path:
    original = load_file(str(path))
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    meta = dict(header.get("__metadata__", {}))
    if metadata is not None:
        meta = metadata(meta)
    save_file(tensors(original) if tensors else original, str(out), metadata=meta)
    return out


def _bad_files(src: Path, tmp: Path) -> dict[str, Path]:
    data = src.read_bytes()
    files = {}
    files["truncated"] = tmp / "truncated.safetensors"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["truncated-header"] = tmp / "truncated-header.safetensors"
    files["truncated-header"].write_bytes(data[:20])
    files["not-safetensors"] = tmp / "text.safetensors"
    files["not-safetensors"].write_text("hello, this is not a checkpoint at all\n" * 10)
    files["pickle"] = tmp / "model.pth"
    torch.save({"weight": torch.zeros(3)}, files["pickle"])
    files["legacy-pickle"] = tmp / "legacy.pt"
    torch.save({"weight": torch.zeros(3)}, files["legacy-pickle"], _use_new_zipfile_serialization=False)
    files["no-metadata"] = _rewrite(src, tmp / "nometa.safetensors", metadata=lambda m: None)
    files["missing-config"] = _rewrite(src, tmp / "noconfig.safetensors", metadata=lambda m: {k: v for k, v in m.items() if k != "config"})
    files["malformed-config"] = _rewrite(src, tmp / "badjson.safetensors", metadata=lambda m: {**m, "config": "{not json"})
    files["config-not-object"] = _rewrite(src, tmp / "cfglist.safetensors", metadata=lambda m: {**m, "config": "[1, 2]"})
    files["config-bad-values"] = _rewrite(
        src, tmp / "cfgbad.safetensors", metadata=lambda m: {**m, "config": json.dumps({**json.loads(m["config"]), "head": "magic"})}
    )
    files["newer-format"] = _rewrite(src, tmp / "newer.safetensors", metadata=lambda m: {**m, "format": "cpl-cert/2"})
    files["foreign-format"] = _rewrite(src, tmp / "foreign.safetensors", metadata=lambda m: {**m, "format": "other/1"})

    def wrong_shape(t):
        t = dict(t)
        t["dense.0.weight"] = torch.zeros(3, 3)
        return t

    def nan_weight(t):
        t = dict(t)
        t["convs.0.weight"] = t["convs.0.weight"].clone()
        t["convs.0.weight"][0, 0, 0, 0] = float("nan")
        return t

    def inf_weight(t):
        t = dict(t)
        t["dense.1.bias"] = t["dense.1.bias"].clone()
        t["dense.1.bias"][0] = float("inf")
        return t

    def missing_tensor(t):
        return {k: v for k, v in t.items() if k != "dense.0.u"}

    def unfrozen(t):
        return {**t, "dense.0.step": torch.zeros(())}

    files["wrong-shape"] = _rewrite(src, tmp / "shape.safetensors", tensors=wrong_shape)
    files["nan"] = _rewrite(src, tmp / "nan.safetensors", tensors=nan_weight)
    files["inf"] = _rewrite(src, tmp / "inf.safetensors", tensors=inf_weight)
    files["missing-tensor"] = _rewrite(src, tmp / "missing.safetensors", tensors=missing_tensor)
    files["unfrozen"] = _rewrite(src, tmp / "unfrozen.safetensors", tensors=unfrozen)
    files["missing-file"] = tmp / "does-not-exist.safetensors"
    files["folder"] = tmp
    return files


@pytest.mark.parametrize("command", ["info", "lipschitz"])
def test_every_bad_file_gives_one_sentence_and_exit_1(tmp_path, tiny_checkpoint, command):
    for kind, path in _bad_files(tiny_checkpoint, tmp_path).items():
        result = runner.invoke(app, [command, str(path)])
        assert result.exit_code == 1, (kind, result.output)
        assert "Traceback" not in result.output, kind
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error:"), (kind, result.stderr)
        with pytest.raises(cpl_cert.CplCertError):
            cpl_cert.load_checkpoint(path)


def test_pickle_is_never_unpickled(tmp_path, monkeypatch):
    import pickle

    path = tmp_path / "evil.pth"
    torch.save({"x": 1}, path)
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(cpl_cert.CplCertError, match="pickle"):
        cpl_cert.load_checkpoint(path)


def _header_len(path: Path) -> int:
    with open(path, "rb") as handle:
        return struct.unpack("<Q", handle.read(8))[0]


@pytest.mark.parametrize("low_bits, mask", [(0x80, 0xFF), (0x4B50, 0xFFFF)])
def test_valid_checkpoint_whose_header_length_looks_like_pickle_magic_loads(tmp_path, tiny_model, low_bits, mask):
    """A header length whose first bytes read 0x80 or 'PK' must not be mistaken for a pickle file."""
    path = tmp_path / "m.safetensors"
    cpl_cert.save_checkpoint(tiny_model, path, training={"pad": ""})
    base = _header_len(path)
    target = base + ((low_bits - base) & mask)
    for pad in range(max(0, target - base - 16), target - base + 16):
        cpl_cert.save_checkpoint(tiny_model, path, training={"pad": "x" * pad})
        if _header_len(path) & mask == low_bits:
            break
    assert _header_len(path) & mask == low_bits
    loaded, meta = cpl_cert.load_checkpoint(path)
    assert torch.equal(loaded(torch.zeros(1, 1, 28, 28)), tiny_model(torch.zeros(1, 1, 28, 28)))
