"""How far ONNX Runtime's logits are from cpl-cert's, on the shipped Fashion-MNIST test split.

Run: python benchmarks/onnx_agreement.py   (needs the onnx and onnxruntime packages)
Exports the shipped model (truncation head) and a random frozen model with an LLN head, runs all
10,000 shipped test images through both runtimes and prints the largest |logit difference|, the
largest |logit|, and how often the predicted classes agree. tests/test_export.py allows 1e-5.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import cpl_cert
from cpl_cert.export import export_onnx, onnx_logits, onnx_metadata

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "fmnist-cpl-xs.safetensors"


def compare(name: str, model: cpl_cert.CPLNet, meta: dict, images: torch.Tensor, folder: Path) -> None:
    path = folder / f"{name}.onnx"
    export_onnx(model, path, onnx_metadata(model, meta, "-"), check_samples=0)
    expected, got = [], []
    for begin in range(0, len(images), 1000):
        batch = images[begin : begin + 1000]
        with torch.inference_mode():
            expected.append(model(batch.float() / 255))
        got.append(onnx_logits(path, batch))
    e, g = torch.cat(expected), torch.cat(got)
    agree = float((e.argmax(1) == g.argmax(1)).double().mean())
    print(f"{name:>10}: max |logit difference| {float((e - g).abs().max()):.3g}, max |logit| {float(e.abs().max()):.3g}, "
          f"same class {100 * agree:.2f} % of {len(images)} images")


def main() -> None:
    torch.set_num_threads(1)
    images = cpl_cert.load_dataset("fashion-mnist", split="test").images
    with tempfile.TemporaryDirectory() as tmp:
        model, meta = cpl_cert.load_checkpoint(SHIPPED)
        compare("truncation", model, meta, images, Path(tmp))
        torch.manual_seed(0)
        lln = cpl_cert.freeze(cpl_cert.build_model("cpl-tiny", input_shape=(1, 28, 28), num_classes=10, head="lln"))
        compare("lln", lln, {"dataset": {"name": "fashion-mnist"}}, images, Path(tmp))


if __name__ == "__main__":
    main()
