"""certify and attack under torchrun: two gloo processes report what one process reports, bit for bit,
and a failure or an interrupt on any process ends all of them with one sentence.

The one-process references run here (CliRunner); the two-process runs go through torchrun and
tests/run_cli.py, which injects faults, slow batches and the float64 threshold from outside the library.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cpl_cert.cli import app

ROOT = Path(__file__).resolve().parents[1]
RUN_CLI = Path(__file__).with_name("run_cli.py")
SHIPPED = ROOT / "models" / "fmnist-cpl-xs.safetensors"
PER_RUN = {"seconds", "images_per_second", "processes"}
"""Report fields that describe the run, not its results."""

certify_module = importlib.import_module("cpl_cert.certification")


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}


def torchrun_command(*args: object, injected: tuple[str, ...] = ()) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(RUN_CLI), *injected, "--",
        *(str(a) for a in args),
    ]


def torchrun(tmp_path: Path, *args: object, injected: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    command = torchrun_command(*args, injected=injected)
    return subprocess.run(command, env=_env(tmp_path), capture_output=True, text=True, timeout=300)


def one_process(*args: object) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def results(report_path: Path) -> dict[str, object]:
    report = json.loads(report_path.read_text())
    return {k: v for k, v in report.items() if k not in PER_RUN}


def error_lines(stderr: str) -> list[str]:
    """cpl-cert's own error sentences (torchrun adds its report of the failed processes around them)."""
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


def exit_codes(folder: Path) -> list[str]:
    return [(folder / f"rank{r}.exit").read_text().strip() for r in range(2)]


def certify_args(folder: Path) -> list[object]:
    return [
        "certify", SHIPPED, "--limit", "64", "--batch-size", "16", "--threads", "1", "--device", "cpu", "--lower-bound-samples", "2",
        "--json", folder / "report.json", "--save-radii", folder / "radii.csv", "--plot", folder / "radius.png",
    ]


def test_certify_on_two_processes_writes_what_one_process_writes(tmp_path: Path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    one_process(*certify_args(one))
    proc = torchrun(tmp_path, *certify_args(two))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert results(two / "report.json") == results(one / "report.json")
    assert json.loads((two / "report.json").read_text())["processes"] == 2
    # --save-radii evaluates every point in float64: the float64 pass's batches are split too.
    assert (two / "radii.csv").read_bytes() == (one / "radii.csv").read_bytes()
    assert (two / "radius.png").read_bytes() == (one / "radius.png").read_bytes()
    assert proc.stdout.count("certified accuracy at eps = 0.25") == 1 and "rank 0 of 2 processes" in proc.stdout  # only rank 0 reports
    assert proc.stdout.count(f"wrote {two / 'report.json'}") == 1


# Undecided fractions of the fast pass on the first 64 test points (default eps): batches of 16 give
# 0, 1/16, 0, 0; batches of 32 give 1/32, 0. Each threshold puts batch 0 on one side and batch 1 (the
# second process's first batch) on the other, so a process that decided on its own first batch would
# evaluate its batches in the other arithmetic and report other float64 counts and radii.
@pytest.mark.parametrize(("batch_size", "threshold", "float64_first"), [(16, 0.03, False), (32, 0.01, True)])
def test_every_process_follows_the_first_batchs_float64_decision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch_size: int, threshold: float, float64_first: bool
):
    args = ["certify", SHIPPED, "--limit", "64", "--batch-size", batch_size, "--threads", "1", "--device", "cpu", "--lower-bound-samples", "0"]
    monkeypatch.setattr(certify_module, "FLOAT64_FIRST", threshold)
    one_process(*args, "--json", tmp_path / "one.json")
    proc = torchrun(tmp_path, *args, "--json", tmp_path / "two.json", injected=("--float64-first", str(threshold)))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    reference = results(tmp_path / "one.json")
    assert (reference["rechecked_float64"] >= 64 - batch_size) == float64_first
    assert results(tmp_path / "two.json") == reference


def attack_args(folder: Path) -> list[object]:
    return [
        "attack", SHIPPED, "--attack", "autoattack", "--steps", "4", "--eps", "0.25,0.5", "--limit", "48", "--batch-size", "16",
        "--threads", "1", "--device", "cpu", "--json", folder / "attack.json", "--plot", folder / "gap.png",
    ]


def test_attack_on_two_processes_reports_what_one_process_reports(tmp_path: Path):
    """APGD-CE, APGD-T, PGD (random starts seeded per batch and radius) and FMN; three batches over two processes."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    one_process(*attack_args(one))
    proc = torchrun(tmp_path, *attack_args(two))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    reference = results(one / "attack.json")
    assert reference["tightness"]["points"] > 0 and len(reference["attacks"]["components"]) >= 2
    assert results(two / "attack.json") == reference
    assert (two / "gap.png").read_bytes() == (one / "gap.png").read_bytes()
    assert proc.stdout.count("no certificate violated") == 1


@pytest.mark.parametrize(
    ("command", "batches", "rank", "sentence"),
    [
        ("certify", "fast_pass", 1, "Error: process 1 of 2 failed: RuntimeError: injected fault"),
        ("attack", "attack_batch", 0, "Error: RuntimeError: injected fault (set CPL_CERT_DEBUG=1 for the traceback)"),
    ],
)
def test_a_failing_process_ends_every_process_with_one_sentence(tmp_path: Path, command: str, batches: str, rank: int, sentence: str):
    """The fault strikes the second batch of one process (torchrun then reports the failed processes too)."""
    args = certify_args(tmp_path) if command == "certify" else attack_args(tmp_path)
    args = [*args[: args.index("--json")], "--json", tmp_path / "report.json"]
    injected = ("--wrap-batches", batches, "--fail-rank", str(rank), "--fail-at", "2", "--exit-dir", str(tmp_path))
    proc = torchrun(tmp_path, *args, injected=injected)
    assert proc.returncode != 0
    assert error_lines(proc.stderr) == [sentence], proc.stderr[-3000:]
    assert exit_codes(tmp_path) == ["1", "1"]
    assert not (tmp_path / "report.json").exists() and proc.stdout == ""


def test_processes_that_hold_different_data_refuse_to_run(tmp_path: Path):
    injected = ("--rank1-args", "--eps 0.3", "--exit-dir", str(tmp_path))
    proc = torchrun(tmp_path, "certify", SHIPPED, "--limit", "32", "--threads", "1", "--device", "cpu", injected=injected)
    assert proc.returncode != 0
    expected = "Error: the processes of this job do not hold the same checkpoint, data and options (process 1 differs from process 0)"
    assert error_lines(proc.stderr) == [expected], proc.stderr[-3000:]
    assert exit_codes(tmp_path) == ["1", "1"]


@pytest.mark.parametrize(
    ("signum", "code", "sentence"), [(signal.SIGINT, 130, "Error: interrupted"), (signal.SIGTERM, 143, "Error: interrupted (SIGTERM)")]
)
def test_an_interrupt_ends_every_process(tmp_path: Path, signum: int, code: int, sentence: str):
    """Ctrl-C reaches torchrun's process group; torchrun passes it on to every process (SIGTERM likewise)."""
    busy = tmp_path / "busy"
    busy.mkdir()
    injected = ("--wrap-batches", "attack_batch", "--busy-dir", str(busy), "--sleep-in-batch", "600", "--exit-dir", str(tmp_path))
    args = [*attack_args(tmp_path)[:-4]]
    proc = subprocess.Popen(
        torchrun_command(*args, injected=injected), env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while len(list(busy.iterdir())) < 2:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "the processes never reached their attacks"
            time.sleep(0.2)
        os.killpg(proc.pid, signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert error_lines(stderr) == [sentence], stderr[-3000:]
    assert exit_codes(tmp_path) == [str(code), str(code)]
