"""Dataset resolution order, IDX reading (gzipped and not), ImageFolder trees, the missing-data sentence."""

from __future__ import annotations

import dataclasses
import gzip
import socket
import struct
from pathlib import Path

import pytest
import torch

from cpl_cert import data
from cpl_cert.data import check_compatible, load_dataset
from cpl_cert.errors import CplCertError


def write_idx(folder: Path, n: int, gz: bool, split_prefix: str = "t10k", fill: int = 0) -> None:
    """A tiny MNIST-format split of ``n`` 28x28 images (all pixels ``fill``) with labels 0..n-1 mod 10."""
    folder.mkdir(parents=True, exist_ok=True)
    images = struct.pack(">IIII", 0x803, n, 28, 28) + bytes([fill]) * (n * 28 * 28)
    labels = struct.pack(">II", 0x801, n) + bytes(i % 10 for i in range(n))
    for name, payload in ((f"{split_prefix}-images-idx3-ubyte", images), (f"{split_prefix}-labels-idx1-ubyte", labels)):
        if gz:
            with gzip.open(folder / f"{name}.gz", "wb") as handle:
                handle.write(payload)
        else:
            (folder / name).write_bytes(payload)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Cache in tmp, no $CPL_CERT_DATA, no downloads, and a system copy we control."""
    monkeypatch.setenv("CPL_CERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CPL_CERT_DATA", raising=False)
    monkeypatch.setenv("CPL_CERT_OFFLINE", "1")
    system = tmp_path / "system"
    monkeypatch.setitem(data.SPECS, "fashion-mnist", dataclasses.replace(data.SPECS["fashion-mnist"], system_dirs=(str(system),)))
    return tmp_path


def test_resolution_order(isolated, monkeypatch):
    write_idx(isolated / "explicit", 3, gz=False, fill=1)          # uncompressed, flat folder
    write_idx(isolated / "env" / "FashionMNIST" / "raw", 4, gz=True, fill=2)  # torchvision layout, gzipped
    write_idx(isolated / "system", 5, gz=True, fill=3)              # like Debian's package
    monkeypatch.setenv("CPL_CERT_DATA", str(isolated / "env"))

    first = load_dataset("fashion-mnist", data_dir=isolated / "explicit")
    assert (len(first), int(first.images.max())) == (3, 1) and first.source.startswith("--data-dir")
    assert first.images.shape == (3, 1, 28, 28) and first.images.dtype == torch.uint8
    assert first.labels.tolist() == [0, 1, 2]

    second = load_dataset("fashion-mnist", data_dir=isolated / "empty")  # a --data-dir without the files is passed over
    assert (len(second), int(second.images.max())) == (4, 2) and second.source.startswith("$CPL_CERT_DATA")

    monkeypatch.delenv("CPL_CERT_DATA")
    third = load_dataset("fashion-mnist")
    assert (len(third), int(third.images.max())) == (5, 3) and third.source.startswith("system copy")

    (isolated / "system" / "t10k-images-idx3-ubyte.gz").unlink()
    shipped = load_dataset("fashion-mnist")
    assert len(shipped) == 10000 and shipped.source.startswith("shipped")
    assert shipped.labels.bincount().tolist() == [1000] * 10  # the real test split, balanced
    # The decompressed copies went to the cache, not next to the sources.
    assert any((isolated / "cache").rglob("t10k-images-idx3-ubyte"))
    assert not (isolated / "system" / "t10k-labels-idx1-ubyte").exists()


def test_changed_source_is_restaged(isolated):
    write_idx(isolated / "src", 3, gz=True, fill=7)
    assert len(load_dataset("fashion-mnist", data_dir=isolated / "src")) == 3
    write_idx(isolated / "src", 6, gz=True, fill=7)
    assert len(load_dataset("fashion-mnist", data_dir=isolated / "src")) == 6


def test_train_split_is_not_shipped(isolated):
    with pytest.raises(CplCertError, match="could not find the fashion-mnist train split"):
        load_dataset("fashion-mnist", split="train")
    write_idx(isolated / "train", 2, gz=False, split_prefix="train")
    assert len(load_dataset("fashion-mnist", split="train", data_dir=isolated / "train")) == 2


def test_unreadable_files_one_sentence(isolated):
    folder = isolated / "broken"
    folder.mkdir()
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(CplCertError, match="unreadable"):
        load_dataset("fashion-mnist", data_dir=folder)


def test_missing_data_offline_sentence(isolated):
    with pytest.raises(CplCertError) as info:
        load_dataset("cifar10", data_dir=isolated / "nothing")
    message = str(info.value)
    assert "could not find the cifar10 test split" in message and str(isolated / "nothing") in message
    assert "--data-dir" in message and "$CPL_CERT_DATA" in message and "\n" not in message


def test_failed_download_is_quiet(isolated, monkeypatch, capfd):
    """With downloads on but no network (name resolution fails), the attempt fails fast and prints nothing."""
    monkeypatch.delenv("CPL_CERT_OFFLINE")

    def no_network(*args, **kwargs):
        raise socket.gaierror("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(CplCertError, match="download into .* failed"):
        load_dataset("mnist", data_dir=isolated / "nothing")
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


def test_unknown_dataset_and_split():
    with pytest.raises(CplCertError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(CplCertError, match="unknown split"):
        load_dataset("fashion-mnist", split="valid")


def make_image_folder(root: Path, size=(6, 5), mode="RGB") -> None:
    from PIL import Image

    for c, name in enumerate(["cats", "dogs"]):
        (root / name).mkdir(parents=True)
        for i in range(3):
            colour = (10 * i + 100 * c, 20, 30) if mode == "RGB" else 10 * i + 100 * c
            Image.new(mode, size, colour).save(root / name / f"{i}.png")


def test_image_folder(tmp_path):
    make_image_folder(tmp_path / "pets")
    ds = load_dataset(f"folder:{tmp_path / 'pets'}")
    assert ds.images.shape == (6, 3, 5, 6) and ds.images.dtype == torch.uint8
    assert ds.classes == ("cats", "dogs") and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert int(ds.images[4, 0, 0, 0]) == 110
    check_compatible(ds, (3, 5, 6), 2)
    with pytest.raises(CplCertError, match="shape"):
        check_compatible(ds, (1, 28, 28), 2)
    with pytest.raises(CplCertError, match="2 classes but the model predicts 10"):
        check_compatible(ds, (3, 5, 6), 10)
    # A <split>/ subfolder is used when present.
    make_image_folder(tmp_path / "split" / "test", mode="L")
    gray = load_dataset(f"folder:{tmp_path / 'split'}")
    assert gray.images.shape == (6, 1, 5, 6)


def test_image_folder_errors(tmp_path):
    with pytest.raises(CplCertError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'none'}")
    make_image_folder(tmp_path / "mixed")
    from PIL import Image

    Image.new("RGB", (9, 9)).save(tmp_path / "mixed" / "cats" / "big.png")
    with pytest.raises(CplCertError, match="same size"):
        load_dataset(f"folder:{tmp_path / 'mixed'}")


def test_subset_limit():
    ds = load_dataset("fashion-mnist").subset(7)
    assert len(ds) == 7
    with pytest.raises(CplCertError, match="--limit"):
        ds.subset(0)
