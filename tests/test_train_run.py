"""End-to-end training runs of cpl-tiny on a few hundred images: they run everywhere, CI included.

The data are gzipped IDX files written into a temporary folder from the Fashion-MNIST test split
that ships in the package (2,000 images to train on, 500 others to evaluate on). Faults are injected
from the tests: a wrapped loss (NaN guard) and tests/run_cli.py (a slow checkpoint write to SIGKILL,
per-rank weight hashes of a DDP run).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TRAIN_IMAGES
from safetensors.torch import load_file
from typer.testing import CliRunner

import cpl_cert
import cpl_cert.train.setup as train_setup
from cpl_cert.checkpoint import read_metadata
from cpl_cert.cli import app
from cpl_cert.data import load_dataset
from cpl_cert.files import file_sha256, portable_path
from cpl_cert.train import TrainOptions, log_path, train

ROOT = Path(__file__).resolve().parents[1]
RUN_CLI = Path(__file__).with_name("run_cli.py")


def tiny(data_dir: Path) -> list[str]:
    return ["--model", "cpl-tiny", "--dataset", "fashion-mnist", "--device", "cpu", "--freeze-iters", "50", "--data-dir", str(data_dir)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_one_epoch_cli_run_gives_a_certifiable_checkpoint(tmp_path: Path, train_data_dir: Path):
    out = tmp_path / "new" / "folder" / "tiny.safetensors"  # train creates the folder
    args = ["train", *tiny(train_data_dir), "--epochs", "1", "--eval-limit", "400", "--lr", "0.01", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "epoch   1/1" in result.output and f"on {TRAIN_IMAGES:,} fashion-mnist images" in result.output
    model, meta = cpl_cert.load_checkpoint(out)
    training = meta["training"]
    assert training["epochs"] == 1 and training["seed"] == 0 and training["loss"]["name"] == "hinge"
    assert training["optimizer"]["name"] == "adam" and "torch" in training["versions"]
    assert training["train_images"] == TRAIN_IMAGES and training["args"]["world_size"] == 1
    recorded = shlex.split(training["command"])  # the options as given (no flags among them here), paths made portable
    assert recorded[:2] == ["cpl-cert", "train"]
    pairs = zip(args[1::2], args[2::2], strict=True)
    given = {option: portable_path(value) if option in ("--out", "--data-dir") else value for option, value in pairs}
    assert dict(zip(recorded[2::2], recorded[3::2], strict=True)) == given
    assert given["--out"] == "tiny.safetensors" and training["args"]["out"] == "tiny.safetensors"  # tmp_path lies outside the working folder
    lines = log_path(out).read_text().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["epoch"] == 1 and entry["eval_n"] == 400 and set(entry["certified"]) == {"0.1", "0.25", "0.5", "1.0"}
    test = load_dataset("fashion-mnist", "test", data_dir=train_data_dir).subset(400)
    cert = cpl_cert.certify(model, test, eps=[0.1, 0.25], device="cpu")
    assert cert.clean_accuracy == pytest.approx(entry["clean_accuracy"])
    assert cert.certified_accuracy(0.1) == pytest.approx(entry["certified"]["0.1"])
    assert cert.clean_accuracy > 0.3  # learnt something beyond chance (0.1)
    assert cert.bounds.upper <= 1.0 + 1e-6
    # Without --resume an existing checkpoint is not overwritten.
    again = CliRunner().invoke(app, ["train", *tiny(train_data_dir), "--epochs", "1", "--train-limit", "100", "--out", str(out)])
    assert again.exit_code == 1 and "already exists" in again.output


def test_architecture_flags_set_what_they_name(tmp_path: Path, train_data_dir: Path):
    out = tmp_path / "custom.safetensors"
    sizes = {"--conv-depth": 1, "--channels": 4, "--conv-inner": 3, "--dense-depth": 1, "--dense-inner": 16}
    args = [*tiny(train_data_dir), "--epochs", "1", "--train-limit", "100", "--eval-limit", "50", "--head", "lln", "--out", str(out)]
    result = CliRunner().invoke(app, ["train", *args, *(str(v) for pair in sizes.items() for v in pair)])
    assert result.exit_code == 0, result.output
    config = cpl_cert.read_metadata(out)["config"]
    assert {flag: config[flag[2:].replace("-", "_")] for flag in sizes} == sizes and config["head"] == "lln"


def _opts(out: Path, data_dir: Path, **kw) -> TrainOptions:
    base = dict(out=out, model="cpl-tiny", epochs=2, limit_train=600, eval_limit=100, batch_size=128, device="cpu",
                freeze_iters=50, data_dir=data_dir)
    base.update(kw)
    return TrainOptions(**base)


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path: Path, train_data_dir: Path):
    full = tmp_path / "full.safetensors"
    split = tmp_path / "split.safetensors"
    events = []
    train(_opts(full, train_data_dir))
    first = train(_opts(split, train_data_dir, stop_after=1), on_event=events.append)
    assert first.stopped_early and read_metadata(split)["training"]["epochs_completed"] == 1
    assert [type(e).__name__ for e in events if type(e).__name__ not in ("StepDone", "Evaluating")] == [
        "Preparing", "RunStarted", "EpochStarted", "Saving", "Saved", "EpochEnded", "Stopped"
    ]
    evaluating = [(e.stage, e.done, e.total) for e in events if type(e).__name__ == "Evaluating"]
    assert evaluating[0] == ("freeze", 0, 50) and evaluating[1:3] == [("float32", 0, 100), ("float32", 100, 100)]
    assert [(e.step, e.steps) for e in events if type(e).__name__ == "StepDone"] == [(s, 5) for s in range(1, 6)]
    events.clear()
    train(_opts(split, train_data_dir, resume=True), on_event=events.append)
    assert [(type(e).__name__, getattr(e, "stage", None)) for e in events[:2]] == [("Preparing", "data"), ("Preparing", "resume")]
    assert type(events[2]).__name__ == "Resumed" and (events[2].epoch, events[2].step) == (1, 5)
    a, b = load_file(str(full)), load_file(str(split))
    assert a.keys() == b.keys()
    for name in a:
        if name != "extra.resume.wall_seconds":
            assert torch.equal(a[name], b[name]), name
    assert len(log_path(split).read_text().splitlines()) == 2
    # Resuming with different options is refused with one sentence.
    with pytest.raises(cpl_cert.CplCertError, match="lr"):
        train(_opts(split, train_data_dir, resume=True, epochs=2, lr=0.01))


def test_nonfinite_loss_stops_with_exit_1_and_keeps_the_last_checkpoint(tmp_path: Path, train_data_dir: Path, monkeypatch):
    """The loss of global step 7 (epoch 2, step 3 of 5) is made NaN by wrapping the loss the run builds."""
    real_make_loss = train_setup.make_loss

    def make_loss(*args, **kwargs):
        loss_fn, calls = real_make_loss(*args, **kwargs), []

        def poisoned(logits, labels):
            calls.append(1)
            loss = loss_fn(logits, labels)
            return loss * float("nan") if len(calls) == 8 else loss  # the 8th call is global step 7

        return poisoned

    monkeypatch.setattr(train_setup, "make_loss", make_loss)
    out = tmp_path / "nan.safetensors"
    args = [*tiny(train_data_dir), "--epochs", "3", "--train-limit", "600", "--eval-limit", "100", "--batch-size", "128", "--out", str(out)]
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 1, result.output
    message = " ".join(result.stderr.split())
    assert message.startswith("Error: training diverged")
    assert "NaN or infinite at epoch 2, step 3 of 5 (global step 7)" in message and "last good checkpoint" in message
    assert "Traceback" not in result.output
    model, meta = cpl_cert.load_checkpoint(out)
    assert meta["training"]["epochs_completed"] == 1


def test_sigkill_during_checkpoint_write_keeps_the_previous_checkpoint(tmp_path: Path, train_data_dir: Path):
    out = tmp_path / "kill.safetensors"
    args = [*tiny(train_data_dir), "--epochs", "1", "--train-limit", "300", "--eval-limit", "100", "--out", str(out)]
    assert CliRunner().invoke(app, ["train", *args]).exit_code == 0
    before = file_sha256(out)
    proc = subprocess.Popen(
        [sys.executable, str(RUN_CLI), "--sleep-in-write", "60", "--", "train", *args, "--overwrite", "--seed", "1"],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 240
        while not [p for p in tmp_path.glob(f".{out.name}.*.tmp") if p.stat().st_size > 0]:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "the checkpoint write never started"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert file_sha256(out) == before
    model, meta = cpl_cert.load_checkpoint(out)
    assert meta["training"]["seed"] == 0
    # The killed write left its temporary file (cpl-cert's own, nothing else); the next start removes it.
    leftovers = sorted(p.name for p in tmp_path.glob(".*"))
    assert len(leftovers) == 1 and leftovers[0].startswith(f".{out.name}.") and leftovers[0].endswith(".tmp")
    again = CliRunner().invoke(app, ["train", *args, "--resume"])
    assert again.exit_code == 0, again.output
    assert f"removed 1 temporary file(s) left by an interrupted checkpoint write: {leftovers[0]}" in again.output
    assert "already finished its 1 epoch" in again.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, log_path(out).name])


def test_two_process_gloo_run_keeps_ranks_identical(tmp_path: Path, train_data_dir: Path):
    out = tmp_path / "ddp.safetensors"
    hashes = tmp_path / "hashes"
    hashes.mkdir()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(RUN_CLI),
        "--weights-dir", str(hashes), "--", "train", *tiny(train_data_dir),
        "--epochs", "1", "--train-limit", "400", "--eval-limit", "100", "--batch-size", "64", "--out", str(out),
    ]
    proc = subprocess.run(cmd, env={**_env(), "TMPDIR": str(tmp_path)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rank0, rank1 = (hashes / "rank0.txt").read_text(), (hashes / "rank1.txt").read_text()
    assert len(rank0.strip()) == 64 and rank0 == rank1
    assert proc.stdout.count("epoch   1/1") == 1 and "2 processes" in proc.stdout  # only rank 0 reports
    model, meta = cpl_cert.load_checkpoint(out)
    assert meta["training"]["world_size"] == 2 and meta["training"]["train_images"] == 400
    assert len(log_path(out).read_text().splitlines()) == 1
