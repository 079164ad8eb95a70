"""Shared fixtures: small frozen models and their checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cpl_cert

# One thread for every test: small ops with several threads crawl when cores are shared
# (subprocess tests, CI neighbours); tiny batches run hundreds of times faster this way.
torch.set_num_threads(1)


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
