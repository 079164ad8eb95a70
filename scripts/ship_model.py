"""Drop the resume state from a training checkpoint and certify the result on the full Fashion-MNIST test split.

    PYTHONPATH=. python scripts/ship_model.py runs/ship/fmnist-cpl-xs.safetensors models/fmnist-cpl-xs.safetensors
"""
import json
import sys

import cpl_cert
from cpl_cert.files import file_sha256

src, dst = sys.argv[1], sys.argv[2]
m, meta = cpl_cert.load_checkpoint(src)
cpl_cert.save_checkpoint(m, dst, dataset=meta["dataset"], training=meta["training"])
model, meta = cpl_cert.load_checkpoint(dst)
test = cpl_cert.load_dataset("fashion-mnist", "test")
r = cpl_cert.certify(model, test, eps="0.1,0.25,0.5,1.0", device="cpu")
certified = " ".join(f"{c['label']}={c['accuracy']:.4f}" for c in r.certified)
print(f"n={r.n} clean={r.clean_accuracy:.4f} {certified} L={r.bounds.upper:.6f} rechecked={r.rechecked} seconds={r.seconds:.1f}")
print("sha256", file_sha256(dst))
print(json.dumps({k: meta["training"][k] for k in ("epochs", "wall_seconds", "clean_accuracy", "certified", "command")}))
