"""Interrupts at any moment end with one sentence: Ctrl-C (SIGINT) and SIGTERM sent to real subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
    """0.3 s after the start the process is still importing torch (seconds); the answer is one line, no traceback."""
    proc = start("lipschitz", str(ROOT / "models" / "fmnist-cpl-xs.safetensors"))
    time.sleep(0.3)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, err, out) == (code, sentence + "\n", "")
