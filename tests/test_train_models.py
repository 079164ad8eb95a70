"""The shipped models load and reproduce the numbers in models/README.md on the full shipped test split."""

from __future__ import annotations

from pathlib import Path

import pytest

import cpl_cert

MODELS = Path(__file__).resolve().parents[1] / "models"

# models/README.md: clean, then certified at 0.1, 0.25, 0.5, 1.0 on all 10,000 test images.
EXPECTED = {"fmnist-cpl-xs.safetensors": (0.8357, {0.1: 0.7996, 0.25: 0.7390, 0.5: 0.6156, 1.0: 0.2980})}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_model_reproduces_readme(name: str):
    model, meta = cpl_cert.load_checkpoint(MODELS / name)
    assert meta["training"]["epochs_completed"] == meta["training"]["epochs"]
    test = cpl_cert.load_dataset("fashion-mnist", "test")
    assert len(test) == 10_000
    result = cpl_cert.certify(model, test, eps=[0.1, 0.25, 0.5, 1.0], device="cpu")
    clean, certified = EXPECTED[name]
    assert result.bounds.upper <= 1.0 + 1e-6
    assert round(result.clean_accuracy, 4) == clean
    for eps, accuracy in certified.items():
        assert round(result.certified_accuracy(eps), 4) == accuracy
    assert (MODELS / name).stat().st_size < 20_000_000
