"""End-to-end training runs on a few hundred to a few thousand Fashion-MNIST images with cpl-tiny."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import cpl_cert
from cpl_cert.checkpoint import read_metadata
from cpl_cert.io import file_sha256
from cpl_cert.cli import app
from cpl_cert.data import load_dataset
from cpl_cert.train import TrainOptions, log_path, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "cpl-tiny", "--dataset", "fashion-mnist", "--device", "cpu", "--freeze-iters", "50"]


def _have_train_split() -> bool:
    try:
        load_dataset("fashion-mnist", "train", download=False)
        return True
    except cpl_cert.CplCertError:
        return False


pytestmark = pytest.mark.skipif(not _have_train_split(), reason="the Fashion-MNIST train split is not installed")


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.update(extra)
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cpl_cert", "train", *TINY, *args]


def test_one_epoch_cli_run_gives_a_certifiable_checkpoint(tmp_path: Path):
    out = tmp_path / "tiny.safetensors"
    result = CliRunner().invoke(app, ["train", *TINY, "--epochs", "1", "--limit-train", "2000", "--eval-limit", "500", "--lr", "0.01", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "epoch   1/1" in result.output
    model, meta = cpl_cert.load_checkpoint(out)
    training = meta["training"]
    assert training["epochs"] == 1 and training["seed"] == 0 and training["loss"]["name"] == "hinge"
    assert training["optimizer"]["name"] == "adam" and "torch" in training["versions"]
    assert training["command"].startswith("cpl-cert") or training["command"] == "cpl-cert "  # CliRunner has no argv
    lines = log_path(out).read_text().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["epoch"] == 1 and entry["eval_n"] == 500 and set(entry["certified"]) == {"0.1", "0.25", "0.5", "1.0"}
    test = load_dataset("fashion-mnist", "test").subset(500)
    cert = cpl_cert.certify(model, test, eps=[0.1, 0.25], device="cpu")
    assert cert.clean_accuracy == pytest.approx(entry["clean_accuracy"])
    assert cert.certified_accuracy(0.1) == pytest.approx(entry["certified"]["0.1"])
    assert cert.clean_accuracy > 0.2  # learnt something beyond chance (0.1)
    assert cert.bounds.upper <= 1.0 + 1e-6
    # Without --resume an existing checkpoint is not overwritten.
    again = CliRunner().invoke(app, ["train", *TINY, "--epochs", "1", "--limit-train", "100", "--out", str(out)])
    assert again.exit_code == 1 and "already exists" in again.output


def _opts(out: Path, **kw) -> TrainOptions:
    base = dict(out=out, model="cpl-tiny", epochs=2, limit_train=600, eval_limit=100, batch_size=128, device="cpu", freeze_iters=50)
    base.update(kw)
    return TrainOptions(**base)


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path: Path):
    full = tmp_path / "full.safetensors"
    split = tmp_path / "split.safetensors"
    train(_opts(full))
    first = train(_opts(split, stop_after=1))
    assert first.stopped_early and read_metadata(split)["training"]["epochs_completed"] == 1
    train(_opts(split, resume=True))
    a, b = load_file(str(full)), load_file(str(split))
    assert a.keys() == b.keys()
    for name in a:
        if name != "extra.resume.wall_seconds":
            assert torch.equal(a[name], b[name]), name
    assert len(log_path(split).read_text().splitlines()) == 2
    # Resuming with different options is refused with one sentence.
    with pytest.raises(cpl_cert.CplCertError, match="lr"):
        train(_opts(split, resume=True, epochs=2, lr=0.01))


def test_nonfinite_loss_stops_with_exit_1_and_keeps_the_last_checkpoint(tmp_path: Path):
    out = tmp_path / "nan.safetensors"
    # 600 images, batch 128 -> 5 steps per epoch; global step 7 is in epoch 2.
    proc = subprocess.run(
        _cli("--epochs", "3", "--limit-train", "600", "--eval-limit", "100", "--batch-size", "128", "--out", str(out)),
        env=_env(CPL_CERT_FAULT_NAN_AT_STEP="7"), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    message = " ".join(proc.stderr.split())
    assert "NaN or infinite at epoch 2, step 3 of 5" in message and "last good checkpoint" in message
    assert "Traceback" not in proc.stderr
    model, meta = cpl_cert.load_checkpoint(out)
    assert meta["training"]["epochs_completed"] == 1


def test_sigkill_during_checkpoint_write_keeps_the_previous_checkpoint(tmp_path: Path):
    out = tmp_path / "kill.safetensors"
    args = ("--epochs", "1", "--limit-train", "300", "--eval-limit", "100", "--out", str(out))
    subprocess.run(_cli(*args), env=_env(), check=True, capture_output=True, timeout=300)
    before = file_sha256(out)
    proc = subprocess.Popen(
        _cli(*args, "--overwrite", "--seed", "1"), env=_env(CPL_CERT_FAULT_SLEEP_IN_WRITE="60"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        while not list(tmp_path.glob(f".{out.name}.*.tmp")):
            assert proc.poll() is None and time.time() < deadline, "the checkpoint write never started"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert file_sha256(out) == before
    model, meta = cpl_cert.load_checkpoint(out)
    assert meta["training"]["seed"] == 0


def test_two_process_gloo_run_keeps_ranks_identical(tmp_path: Path):
    out = tmp_path / "ddp.safetensors"
    hashes = tmp_path / "hashes"
    hashes.mkdir()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cpl_cert", "train",
        *TINY, "--epochs", "1", "--limit-train", "400", "--eval-limit", "100", "--batch-size", "64", "--out", str(out),
    ]
    proc = subprocess.run(cmd, env=_env(CPL_CERT_TEST_WEIGHTS_DIR=str(hashes)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rank0, rank1 = (hashes / "rank0.txt").read_text(), (hashes / "rank1.txt").read_text()
    assert len(rank0.strip()) == 64 and rank0 == rank1
    assert proc.stdout.count("epoch   1/1") == 1  # only rank 0 logs
    model, meta = cpl_cert.load_checkpoint(out)
    assert meta["training"]["world_size"] == 2
    assert len(log_path(out).read_text().splitlines()) == 1
