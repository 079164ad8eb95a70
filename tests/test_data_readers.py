"""Every dataset reader on small files written in the real formats: the right pixels in the right places.

The files come from tests/formats.py, which writes each format from its specification; the expected
arrays are nested Python lists of ``pixel(n, c, r, col)``, built without numpy reshapes or torch.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from formats import expected, write_cifar_batch, write_idx_split, write_image_folder

from cpl_cert.data import load_dataset
from cpl_cert.data.cifar import read_batch
from cpl_cert.data.idx import read_idx
from cpl_cert.errors import CplCertError


def as_tensor(nested: list) -> torch.Tensor:
    return torch.tensor(nested, dtype=torch.uint8)


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
@pytest.mark.parametrize("name, layout", [("fashion-mnist", "FashionMNIST/raw"), ("mnist", "MNIST/raw"), ("mnist", ".")])
def test_idx_files_read_pixel_for_pixel(tmp_path, gz, name, layout):
    folder = tmp_path / layout
    write_idx_split(folder, "train", 5, [3, 1, 4, 1, 5], gz=gz)
    write_idx_split(folder, "t10k", 2, [9, 2], gz=gz)
    train = load_dataset(name, "train", data_dir=tmp_path)
    assert train.images.dtype == torch.uint8 and train.images.shape == (5, 1, 28, 28)
    assert torch.equal(train.images, as_tensor(expected(range(5), 1, 28, 28)))
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == [3, 1, 4, 1, 5]
    test = load_dataset(name, "test", data_dir=tmp_path)
    assert torch.equal(test.images, as_tensor(expected(range(2), 1, 28, 28))) and test.labels.tolist() == [9, 2]
    assert test.source == f"--data-dir: {folder if layout != '.' else tmp_path}"


def test_idx_reader_keeps_any_shape_row_major(tmp_path):
    write_idx_split(tmp_path, "t10k", 3, [0, 1, 2], size=(4, 6), gz=False)
    images = read_idx(tmp_path / "t10k-images-idx3-ubyte")
    assert images.shape == (3, 4, 6)
    assert torch.equal(images, as_tensor(expected(range(3), 1, 4, 6))[:, 0])


@pytest.mark.parametrize(
    "damage, phrase",
    [
        (lambda b: b[:-5], "holds 779 bytes of data, its header announces 784"),
        (lambda b: b[:6], "ends inside its header"),
        (lambda b: b[:2] + b"\x0d" + b[3:], "type 0x0d"),
        (lambda b: b"PK" + b[2:], "not an IDX file"),
    ],
)
def test_damaged_idx_file_is_one_sentence(tmp_path, damage, phrase):
    write_idx_split(tmp_path, "t10k", 1, [0], gz=False)
    file = tmp_path / "t10k-images-idx3-ubyte"
    file.write_bytes(damage(file.read_bytes()))
    with pytest.raises(CplCertError, match=f"fashion-mnist files in {tmp_path} are unreadable .*{phrase}"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_gzip_that_is_not_gzip_is_one_sentence(tmp_path):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(CplCertError, match="unreadable"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_reading_writes_nothing(tmp_path, monkeypatch):
    """The gzipped files are read as they are: no decompressed copy anywhere (no cache is made)."""
    monkeypatch.setenv("CPL_CERT_CACHE", str(tmp_path / "cache"))
    write_idx_split(tmp_path / "src", "t10k", 4, [0, 1, 2, 3])
    assert len(load_dataset("fashion-mnist", data_dir=tmp_path / "src")) == 4
    assert len(load_dataset("fashion-mnist")) == 10_000  # the shipped split, gzipped too
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["src", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


@pytest.mark.parametrize("bytes_keys", [False, True], ids=["str-keys", "bytes-keys"])
def test_cifar10_batches_in_torchvision_layout(tmp_path, bytes_keys):
    folder = tmp_path / "cifar-10-batches-py"
    for b in range(5):  # two images per training batch, images 2b and 2b+1
        write_cifar_batch(folder / f"data_batch_{b + 1}", 2 * b, [b, 9 - b], "labels", bytes_keys=bytes_keys)
    write_cifar_batch(folder / "test_batch", 100, [7, 3, 5], "labels", bytes_keys=bytes_keys)
    train = load_dataset("cifar10", "train", data_dir=tmp_path)
    assert train.images.shape == (10, 3, 32, 32) and train.images.dtype == torch.uint8
    assert torch.equal(train.images, as_tensor(expected(range(10), 3, 32, 32)))
    assert train.labels.tolist() == [0, 9, 1, 8, 2, 7, 3, 6, 4, 5]
    test = load_dataset("cifar10", "test", data_dir=tmp_path)
    assert torch.equal(test.images, as_tensor(expected(range(100, 103), 3, 32, 32))) and test.labels.tolist() == [7, 3, 5]
    assert test.num_classes == 10 and test.source == f"--data-dir: {folder}"
    # A red pixel is the first plane of a row: row 0, byte 32 * 2 + 5 is channel 0, row 2, column 5.
    assert int(test.images[0, 0, 2, 5]) == (100 * 37 + 0 * 101 + 2 * 7 + 5 * 3 + 5) % 256


def test_cifar100_uses_the_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    write_cifar_batch(folder / "train", 0, [42, 99, 0], "fine_labels", extra={"coarse_labels": [1, 2, 3]})
    write_cifar_batch(folder / "test", 3, [17], "fine_labels", extra={"coarse_labels": [4]})
    train = load_dataset("cifar100", "train", data_dir=tmp_path)
    assert train.labels.tolist() == [42, 99, 0] and train.num_classes == 100
    assert torch.equal(train.images, as_tensor(expected(range(3), 3, 32, 32)))
    test = load_dataset("cifar100", "test", data_dir=folder)  # the batches folder itself works too
    assert test.labels.tolist() == [17] and torch.equal(test.images, as_tensor(expected([3], 3, 32, 32)))


def test_cifar_missing_batch_means_not_there(tmp_path):
    write_cifar_batch(tmp_path / "cifar-10-batches-py" / "data_batch_1", 0, [1], "labels")
    expected = r"--data-dir .* does not hold the cifar10 train split: expected cifar-10-batches-py/ with data_batch_1, data_batch_2"
    with pytest.raises(CplCertError, match=expected):
        load_dataset("cifar10", "train", data_dir=tmp_path)


class _Payload:
    """Unpickling this would delete ``victim``."""

    def __init__(self, victim: Path) -> None:
        self.victim = victim

    def __reduce__(self):
        return (os.remove, (str(self.victim),))


def test_cifar_pickle_cannot_run_code(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("still here")
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({"data": _Payload(victim), "labels": [0]}, handle, protocol=2)
    with pytest.raises(CplCertError, match=r"unreadable .*posix\.remove|unreadable .*os\.remove"):
        load_dataset("cifar10", data_dir=tmp_path)
    assert victim.read_text() == "still here"


def test_cifar_batch_with_wrong_row_length_is_refused(tmp_path):
    path = tmp_path / "test_batch"
    with open(path, "wb") as handle:
        pickle.dump({"data": [[0] * 3071], "labels": [0]}, handle, protocol=2)
    with pytest.raises(ValueError, match="not N x 3072 bytes"):
        read_batch(path, "labels")


@pytest.mark.parametrize("mode, channels", [("L", 1), ("RGB", 3)])
def test_image_folder_pixels_labels_and_channels(tmp_path, mode, channels):
    write_image_folder(tmp_path / "pets", {"cats": 2, "dogs": 3}, size=(5, 6), mode=mode)
    ds = load_dataset(f"folder:{tmp_path / 'pets'}")
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (5, channels, 5, 6)
    assert ds.classes == ("cats", "dogs") and ds.labels.tolist() == [0, 0, 1, 1, 1]
    assert torch.equal(ds.images, as_tensor(expected([0, 1, 10, 11, 12], channels, 5, 6)))
    assert ds.default_eps == (("36/255", "72/255", "108/255") if channels == 3 else ("0.1", "0.25", "0.5", "1.0"))
    pixels = ds.images.double() / 255
    assert ds.mean == pytest.approx([float(pixels[:, c].mean()) for c in range(channels)])


def test_image_folder_split_subfolder_is_preferred(tmp_path):
    write_image_folder(tmp_path / "data" / "train", {"a": 1, "b": 1}, size=(3, 3), mode="L")
    write_image_folder(tmp_path / "data" / "test", {"a": 2, "b": 1, "c": 1}, size=(3, 3), mode="L")
    assert len(load_dataset(f"folder:{tmp_path / 'data'}", "train")) == 2
    test = load_dataset(f"folder:{tmp_path / 'data'}", "test")
    assert len(test) == 4 and test.classes == ("a", "b", "c")
