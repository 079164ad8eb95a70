"""Shared fixtures: a machine that looks like a fresh one, small frozen models and their checkpoints."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

import cpl_cert
from cpl_cert.data import SPECS

# One thread for every test: small ops with several threads crawl when cores are shared
# (subprocess tests, CI neighbours); tiny batches run hundreds of times faster this way.
torch.set_num_threads(1)

# Property tests keep no example database, and hypothesis' other files go to a temporary folder
# (set before collection, which already writes there): nothing lands in the working tree.
settings.register_profile("cpl-cert", database=None)
settings.load_profile("cpl-cert")


def pytest_configure(config):
    config.cpl_cert_hypothesis_dir = tempfile.mkdtemp(prefix="cpl-cert-hypothesis-")
    set_hypothesis_home_dir(config.cpl_cert_hypothesis_dir)


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "cpl_cert_hypothesis_dir", ""), ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def fresh_machine(tmp_path_factory):
    """Every test sees what CI sees: no system copy of a dataset, no ``$CPL_CERT_DATA``, no downloads,
    and caches (cpl-cert's, matplotlib's) in temporary folders; subprocesses inherit it."""
    with pytest.MonkeyPatch.context() as patch:
        for name, spec in list(SPECS.items()):
            patch.setitem(SPECS, name, dataclasses.replace(spec, system_dirs=()))
        patch.delenv("CPL_CERT_DATA", raising=False)
        patch.setenv("CPL_CERT_OFFLINE", "1")
        patch.setenv("CPL_CERT_CACHE", str(tmp_path_factory.mktemp("cpl-cert-cache")))
        patch.setenv("MPLCONFIGDIR", str(tmp_path_factory.mktemp("matplotlib")))
        yield


TRAIN_IMAGES, TEST_IMAGES = 2000, 500


@pytest.fixture(scope="session")
def train_data_dir(tmp_path_factory) -> Path:
    """A Fashion-MNIST folder for training runs, made from the shipped test split: gzipped IDX ``train-*``
    (its first 2,000 images) and ``t10k-*`` (the next 500)."""
    from formats import write_idx_split

    shipped = cpl_cert.load_dataset("fashion-mnist")
    folder = tmp_path_factory.mktemp("fashion-mnist")
    parts = {"train": slice(0, TRAIN_IMAGES), "t10k": slice(TRAIN_IMAGES, TRAIN_IMAGES + TEST_IMAGES)}
    for prefix, part in parts.items():
        images = [image.numpy().tobytes() for image in shipped.images[part, 0]]
        write_idx_split(folder, prefix, images, shipped.labels[part].tolist())
    return folder


def make_frozen(preset: str = "cpl-tiny", input_shape=(1, 28, 28), num_classes: int = 10, seed: int = 0, **overrides):
    """A frozen model with random weights (seeded)."""
    torch.manual_seed(seed)
    model = cpl_cert.build_model(preset, input_shape=input_shape, num_classes=num_classes, **overrides)
    return cpl_cert.freeze(model)


@pytest.fixture
def tiny_model():
    return make_frozen()


@pytest.fixture
def tiny_checkpoint(tmp_path: Path, tiny_model) -> Path:
    path = tmp_path / "tiny.safetensors"
    cpl_cert.save_checkpoint(
        tiny_model,
        path,
        dataset={"name": "fashion-mnist", "input_shape": [1, 28, 28], "num_classes": 10},
        training={"epochs": 0, "seed": 0},
    )
    return path
