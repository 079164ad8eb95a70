"""The same work on a CUDA GPU: certification agrees with the CPU, training runs (float32 and bf16).

Skipped, with the reason, on machines without CUDA; run them with ``python -m pytest tests/test_gpu.py``
on a machine that has one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cpl_cert
from cpl_cert.train import TrainOptions, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
MODEL = Path(__file__).resolve().parents[1] / "models" / "fmnist-cpl-xs.safetensors"


def test_certify_on_the_gpu_agrees_with_the_cpu():
    data = cpl_cert.load_dataset("fashion-mnist").subset(2000)
    cpu_model, _ = cpl_cert.load_checkpoint(MODEL)
    gpu_model, _ = cpl_cert.load_checkpoint(MODEL, device="cuda")
    cpu = cpl_cert.certify(cpu_model, data, eps=[0.1, 0.25], device="cpu")
    gpu = cpl_cert.certify(gpu_model, data, eps=[0.1, 0.25], device="cuda")
    assert gpu.device.startswith("cuda") and cpu.device == "cpu"
    assert gpu.bounds.upper == pytest.approx(cpu.bounds.upper, rel=1e-9)
    same = gpu.predictions == cpu.predictions
    assert float(same.double().mean()) >= 0.999
    assert torch.allclose(gpu.radii[same], cpu.radii[same], atol=1e-4)
    assert abs(gpu.clean_accuracy - cpu.clean_accuracy) <= 0.001


@pytest.mark.parametrize("preset", ["cpl-tiny", "sll-xs"])
@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
def test_one_epoch_trains_on_the_gpu(tmp_path, train_data_dir, bf16, preset):
    out = tmp_path / "gpu.safetensors"
    options = TrainOptions(
        out=out, model=preset, epochs=1, eval_limit=200, lr=0.01, device="cuda", bf16=bf16, data_dir=train_data_dir, freeze_iters=50
    )
    result = train(options)
    model, meta = cpl_cert.load_checkpoint(out)
    assert meta["training"]["device"].startswith("cuda")
    assert cpl_cert.lipschitz_bounds(model).upper <= 1.0 + 1e-6
    assert result.history[0].clean_accuracy > 0.2  # learnt something beyond chance (0.1)
