"""Dataset resolution order, the missing-data sentences, data/model compatibility, pixel scaling."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest
import torch
from formats import write_idx_split, write_image_folder

from cpl_cert import data
from cpl_cert.data import check_compatible, load_dataset, to_float_images
from cpl_cert.errors import CplCertError


def write_idx(folder: Path, n: int, gz: bool, split_prefix: str = "t10k", fill: int = 0) -> None:
    """A tiny MNIST-format split of ``n`` 28x28 images (all pixels ``fill``) with labels 0..n-1 mod 10."""
    write_idx_split(folder, split_prefix, [bytes([fill]) * 784] * n, [i % 10 for i in range(n)], gz=gz)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A system copy of Fashion-MNIST we control (conftest already hides the real ones)."""
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

    second = load_dataset("fashion-mnist")
    assert (len(second), int(second.images.max())) == (4, 2) and second.source.startswith("$CPL_CERT_DATA")

    monkeypatch.delenv("CPL_CERT_DATA")
    third = load_dataset("fashion-mnist")
    assert (len(third), int(third.images.max())) == (5, 3) and third.source.startswith("system copy")

    (isolated / "system" / "t10k-images-idx3-ubyte.gz").unlink()
    shipped = load_dataset("fashion-mnist")
    assert len(shipped) == 10000 and shipped.source.startswith("shipped")
    assert shipped.labels.bincount().tolist() == [1000] * 10  # the real test split, balanced


def test_a_data_dir_without_the_split_is_refused_not_passed_over(isolated, monkeypatch):
    """The user's own copy is never silently replaced by another (here: $CPL_CERT_DATA, which holds the split)."""
    write_idx(isolated / "env", 4, gz=True)
    monkeypatch.setenv("CPL_CERT_DATA", str(isolated / "env"))
    with pytest.raises(CplCertError, match=r"^--data-dir .*missing does not exist$"):
        load_dataset("fashion-mnist", data_dir=isolated / "missing")
    (isolated / "empty").mkdir()
    with pytest.raises(CplCertError) as info:
        load_dataset("fashion-mnist", data_dir=isolated / "empty")
    assert str(info.value) == (
        f"--data-dir {isolated / 'empty'} does not hold the fashion-mnist test split: expected t10k-images-idx3-ubyte[.gz] "
        "and t10k-labels-idx1-ubyte[.gz] (or FashionMNIST/raw/ with them)"
    )


def test_a_data_dir_that_is_a_file_is_called_a_file(isolated):
    (isolated / "notes.txt").write_text("x")
    with pytest.raises(CplCertError, match=r"^--data-dir .*notes.txt is a file, not a folder$"):
        load_dataset("fashion-mnist", data_dir=isolated / "notes.txt")


@pytest.mark.parametrize("what", ["missing", "empty", "file"])
def test_a_mistyped_cpl_cert_data_stops_like_data_dir(isolated, monkeypatch, what):
    """A $CPL_CERT_DATA that names nothing usable stops with one sentence, rather than passing on to the
    system copy (which holds the split here)."""
    write_idx(isolated / "system", 5, gz=True)
    target = isolated / what
    if what == "empty":
        target.mkdir()
    elif what == "file":
        target.write_text("x")
    monkeypatch.setenv("CPL_CERT_DATA", str(target))
    expected = {"missing": "does not exist", "empty": "is an empty folder", "file": "is a file, not a folder"}[what]
    with pytest.raises(CplCertError) as info:
        load_dataset("fashion-mnist")
    assert str(info.value).startswith(f"$CPL_CERT_DATA={target} {expected}"), str(info.value)
    assert "unset CPL_CERT_DATA" in str(info.value)


def test_cpl_cert_data_may_hold_other_datasets(isolated, monkeypatch):
    """A data root with other datasets in it is not a typo: a split it lacks comes from the next place."""
    write_idx(isolated / "root" / "MNIST" / "raw", 3, gz=True)
    write_idx(isolated / "system", 5, gz=True)
    monkeypatch.setenv("CPL_CERT_DATA", str(isolated / "root"))
    assert load_dataset("mnist").source.startswith("$CPL_CERT_DATA")
    assert load_dataset("fashion-mnist").source.startswith("system copy")


def test_the_system_copy_can_be_kept_out(isolated, monkeypatch):
    write_idx(isolated / "system", 5, gz=True)
    assert load_dataset("fashion-mnist").source.startswith("system copy")
    monkeypatch.setenv("CPL_CERT_NO_SYSTEM_COPY", "1")
    assert load_dataset("fashion-mnist").source.startswith("shipped test split")
    with pytest.raises(CplCertError, match="could not find the fashion-mnist train split") as info:
        load_dataset("fashion-mnist", split="train")
    assert str(isolated / "system") not in str(info.value) and "$CPL_CERT_NO_SYSTEM_COPY is set" in str(info.value)


def test_train_split_is_not_shipped(isolated):
    with pytest.raises(CplCertError, match="could not find the fashion-mnist train split") as info:
        load_dataset("fashion-mnist", split="train")
    assert "apt-get install dataset-fashion-mnist" in str(info.value) and "torchvision.datasets.FashionMNIST" in str(info.value)
    write_idx(isolated / "train", 2, gz=False, split_prefix="train")
    assert len(load_dataset("fashion-mnist", split="train", data_dir=isolated / "train")) == 2


def test_unreadable_files_one_sentence(isolated):
    folder = isolated / "broken"
    folder.mkdir()
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(CplCertError, match="unreadable"):
        load_dataset("fashion-mnist", data_dir=folder)


def test_missing_data_offline_sentence(isolated, monkeypatch):
    (isolated / "nothing").mkdir()
    (isolated / "nothing" / "README").write_text("a data root without CIFAR-10")
    monkeypatch.setenv("CPL_CERT_DATA", str(isolated / "nothing"))
    with pytest.raises(CplCertError) as info:
        load_dataset("cifar10")
    message = str(info.value)
    assert "could not find the cifar10 test split" in message and str(isolated / "nothing") in message
    assert "--data-dir" in message and "$CPL_CERT_DATA" in message and "\n" not in message
    assert "apt-get" not in message  # no Debian package holds CIFAR-10


def test_failed_download_is_quiet(isolated, monkeypatch, capfd):
    """With downloads on but no network (name resolution fails), the attempt fails fast and prints nothing."""
    monkeypatch.delenv("CPL_CERT_OFFLINE")

    def no_network(*args, **kwargs):
        raise socket.gaierror("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(CplCertError, match="download into .* failed"):
        load_dataset("mnist")
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


def test_unknown_dataset_and_split():
    with pytest.raises(CplCertError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(CplCertError, match="unknown split"):
        load_dataset("fashion-mnist", split="valid")


def test_image_folder_errors(tmp_path):
    with pytest.raises(CplCertError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'none'}")
    write_image_folder(tmp_path / "mixed", {"cats": 2}, size=(5, 6), mode="RGB")
    write_image_folder(tmp_path / "mixed", {"dogs": 1}, size=(9, 9), mode="RGB")
    with pytest.raises(CplCertError, match="same size"):
        load_dataset(f"folder:{tmp_path / 'mixed'}")
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    with pytest.raises(CplCertError, match="not an image folder tree"):
        load_dataset(f"folder:{tmp_path / 'empty'}")


def test_check_compatible(tmp_path):
    write_image_folder(tmp_path / "pets", {"cats": 1, "dogs": 1}, size=(5, 6), mode="RGB")
    ds = load_dataset(f"folder:{tmp_path / 'pets'}")
    check_compatible(ds, (3, 5, 6), 2)
    with pytest.raises(CplCertError, match=r"have shape \(3, 5, 6\) but the model expects \(1, 28, 28\)"):
        check_compatible(ds, (1, 28, 28), 2)
    with pytest.raises(CplCertError, match="2 classes but the model predicts 10"):
        check_compatible(ds, (3, 5, 6), 10)


def test_to_float_images_scales_uint8_and_refuses_other_integers():
    pixels = torch.tensor([[0, 51, 255]], dtype=torch.uint8)
    assert to_float_images(pixels)[0].tolist() == pytest.approx([0.0, 0.2, 1.0], rel=1e-7)
    assert to_float_images(pixels).dtype == torch.float32
    floats = torch.tensor([0.25, 0.5], dtype=torch.float64)
    assert to_float_images(floats).dtype == torch.float32 and to_float_images(floats).tolist() == [0.25, 0.5]
    for dtype in (torch.int64, torch.int32, torch.int16, torch.bool):
        with pytest.raises(CplCertError, match="uint8 pixels .* or floating-point pixels in \\[0, 1\\]"):
            to_float_images(pixels.to(dtype))


def test_subset_limit():
    ds = load_dataset("fashion-mnist").subset(7)
    assert len(ds) == 7
    with pytest.raises(CplCertError, match="--limit"):
        ds.subset(0)
