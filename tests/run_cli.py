"""Run the ``cpl-cert`` command line in a subprocess with faults injected from outside the library.

    python tests/run_cli.py [--sleep-in-write SECONDS] [--weights-dir DIR] -- train ...

Like conftest.py in-process, it hides system copies of the datasets. ``--sleep-in-write``: every
checkpoint write pauses after its temporary file is complete, before the rename (so a test can
SIGKILL a write in progress). ``--weights-dir``: after every epoch each process writes the SHA-256
of its live weights to ``DIR/rank<r>.txt`` (so a test can compare the ranks of a DDP run).
Works under ``torchrun`` too (``torchrun ... tests/run_cli.py ...``).

For certify and attack, ``--wrap-batches BATCH`` wraps a per-batch library function (``fast_pass``,
certify's first pass over one batch, or ``attack_batch``, the attacks on one batch): with
``--fail-rank R --fail-at K`` process R's K-th call raises ``RuntimeError("injected fault")``; with
``--busy-dir DIR --sleep-in-batch S`` every call writes ``DIR/rank<r>.busy`` and sleeps S seconds (so a
test can interrupt a run in progress); ``--float64-first X`` sets ``cpl_cert.certification.FLOAT64_FIRST``; ``--exit-dir DIR``: each
process writes its exit code to ``DIR/rank<r>.exit``; ``--rank1-args "ARGS"`` appends ARGS to the command
line of process 1 only (so that the processes of a job disagree).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import shlex
import sys
import time
from pathlib import Path


def hide_system_copies() -> None:
    from cpl_cert.data import SPECS

    for name, spec in list(SPECS.items()):
        SPECS[name] = dataclasses.replace(spec, system_dirs=())


def sleep_in_checkpoint_writes(seconds: float) -> None:
    import cpl_cert.checkpoint as checkpoint

    real = checkpoint.atomic_write

    def slow(path, content):
        def write(tmp: str) -> None:
            Path(tmp).write_bytes(content)
            time.sleep(seconds)

        return real(path, write)

    checkpoint.atomic_write = slow


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def record_weights(folder: Path) -> None:
    import cpl_cert.train.loop as loop

    real = loop.run_epoch

    def run_epoch(run, epoch, on_event):
        totals = real(run, epoch, on_event)
        (folder / f"rank{run.info.rank}.txt").write_text(weights_digest(run.model) + "\n")
        return totals

    loop.run_epoch = run_epoch


BATCH_FUNCTIONS = {"fast_pass": ("cpl_cert.certification", "fast_pass"), "attack_batch": ("cpl_cert.attacks.ensemble", "_attack_batch")}


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def wrap_batches(name: str, fail_rank: int | None, fail_at: int | None, busy_dir: Path | None, sleep: float) -> None:
    """Wrap one per-batch library function: fail at its ``fail_at``-th call on ``fail_rank``, or mark and sleep."""
    import importlib

    module_name, attribute = BATCH_FUNCTIONS[name]
    module = importlib.import_module(module_name)
    real = getattr(module, attribute)
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if fail_rank == rank() and calls[0] == fail_at:
            raise RuntimeError("injected fault")
        if busy_dir is not None:
            (busy_dir / f"rank{rank()}.busy").write_text(f"{calls[0]}\n")
        if sleep:
            time.sleep(sleep)
        return real(*args, **kwargs)

    setattr(module, attribute, wrapped)


def run_and_record_exit(exit_dir: Path | None) -> None:
    from cpl_cert.cli import main as cli_main

    code: object = 0
    try:
        cli_main()
    except SystemExit as exc:
        code = exc.code if exc.code is not None else 0
        raise
    finally:
        if exit_dir is not None:
            (exit_dir / f"rank{rank()}.exit").write_text(f"{code}\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sleep-in-write", type=float)
    parser.add_argument("--weights-dir", type=Path)
    parser.add_argument("--wrap-batches", choices=sorted(BATCH_FUNCTIONS))
    parser.add_argument("--fail-rank", type=int)
    parser.add_argument("--fail-at", type=int, default=1)
    parser.add_argument("--busy-dir", type=Path)
    parser.add_argument("--sleep-in-batch", type=float, default=0.0)
    parser.add_argument("--float64-first", type=float)
    parser.add_argument("--exit-dir", type=Path)
    parser.add_argument("--rank1-args", default="")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args()
    args = options.args[1:] if options.args[:1] == ["--"] else options.args
    hide_system_copies()
    if options.sleep_in_write:
        sleep_in_checkpoint_writes(options.sleep_in_write)
    if options.weights_dir:
        record_weights(options.weights_dir)
    if options.wrap_batches:
        wrap_batches(options.wrap_batches, options.fail_rank, options.fail_at, options.busy_dir, options.sleep_in_batch)
    if options.float64_first is not None:
        import importlib

        importlib.import_module("cpl_cert.certification").FLOAT64_FIRST = options.float64_first
    sys.argv = ["cpl-cert", *args, *(shlex.split(options.rank1_args) if rank() == 1 else [])]
    run_and_record_exit(options.exit_dir)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
