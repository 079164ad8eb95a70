"""Interrupts at any moment end with one sentence: Ctrl-C (SIGINT) and SIGTERM sent to real subprocesses."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import cpl_cert

ROOT = Path(__file__).resolve().parents[1]


def start(*args: str, cwd: Path = ROOT, **popen) -> subprocess.Popen:
    """``python -m cpl_cert ARGS`` with this checkout first on the path, output captured as text."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "cpl_cert", *args], env=env, cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


@pytest.mark.parametrize(
    "signum, code, sentence", [(signal.SIGINT, 130, "Error: interrupted"), (signal.SIGTERM, 143, "Error: interrupted (SIGTERM)")]
)
def test_signal_during_start_up_is_one_sentence(signum, code, sentence, tmp_path):
    """Signals sent across the import window (torch, numpy: seconds) each end with one line, no traceback.

    A KeyboardInterrupt raised inside an extension module's import was swallowed (exit 0, the command
    ran) or left numpy half-loaded (a traceback), depending on the moment: hence several moments.
    """
    for delay in (0.0, 0.1, 0.2, 0.3, 0.45, 0.6, 0.9, 1.2):
        proc = start("lipschitz", str(ROOT / "models" / "fmnist-cpl-xs.safetensors"))
        wait_until_catching(proc, signal.SIGTERM)  # the interpreter's own start-up is not cpl-cert's to answer
        time.sleep(delay)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
        assert (delay, proc.returncode, err, out) == (delay, code, sentence + "\n", "")


def wait_until_catching(proc: subprocess.Popen, signum: int, seconds: float = 30.0) -> None:
    """Wait until ``proc`` catches ``signum`` (Linux: the SigCgt mask of /proc/PID/status): cpl-cert's start-up
    handler is in place. Before it, a signal meets the interpreter's own defaults, on a loaded machine for
    longer than the smallest delay; what the test checks starts with cpl-cert's first line of code."""
    deadline = time.monotonic() + seconds
    status = Path(f"/proc/{proc.pid}/status")
    while time.monotonic() < deadline and proc.poll() is None:
        if not status.exists():
            return  # not Linux: fall back to the delays alone
        caught = next((line.split()[1] for line in status.read_text().splitlines() if line.startswith("SigCgt:")), "0")
        if int(caught, 16) >> (signum - 1) & 1:
            return
        time.sleep(0.005)


RUN_CLI = Path(__file__).with_name("run_cli.py")


def wait_for_line(proc: subprocess.Popen, text: str, seconds: float) -> str:
    """Read ``proc``'s stdout until a line contains ``text`` (the process is killed after ``seconds``)."""
    watchdog = threading.Timer(seconds, proc.kill)
    watchdog.start()
    try:
        for line in proc.stdout:
            if text in line:
                return line
    finally:
        watchdog.cancel()
    raise AssertionError(f"no line with {text!r}; stderr: {proc.stderr.read()[-2000:]}")


@pytest.mark.parametrize("signum, code, what", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "interrupted (SIGTERM)")])
def test_interrupted_training_says_which_epoch_survived(signum, code, what, tmp_path, train_data_dir):
    """The sentence names the checkpoint, the epoch it holds (checked against the file) and how to continue."""
    out = tmp_path / "run.safetensors"
    args = ["train", "--model", "cpl-tiny", "--device", "cpu", "--freeze-iters", "20", "--data-dir", str(train_data_dir),
            "--epochs", "50", "--train-limit", "300", "--eval-limit", "100", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(RUN_CLI), "--", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_line(proc, "epoch   1/50", 240)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    match = re.fullmatch(rf"Error: {re.escape(what)}; {re.escape(str(out))} holds epoch (\d+); "
                         r"continue with the same command and --resume\n", err)
    assert proc.returncode == code and match, err
    _, meta = cpl_cert.load_checkpoint(out)
    assert meta["training"]["epochs_completed"] == int(match.group(1)) >= 1
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
