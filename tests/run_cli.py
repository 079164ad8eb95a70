"""Run the ``cpl-cert`` command line in a subprocess with faults injected from outside the library.

    python tests/run_cli.py [--sleep-in-write SECONDS] [--weights-dir DIR] -- train ...

Like conftest.py in-process, it hides system copies of the datasets. ``--sleep-in-write``: every
checkpoint write pauses after its temporary file is complete, before the rename (so a test can
SIGKILL a write in progress). ``--weights-dir``: after every epoch each process writes the SHA-256
of its live weights to ``DIR/rank<r>.txt`` (so a test can compare the ranks of a DDP run).
Works under ``torchrun`` too (``torchrun ... tests/run_cli.py ...``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sleep-in-write", type=float)
    parser.add_argument("--weights-dir", type=Path)
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args()
    args = options.args[1:] if options.args[:1] == ["--"] else options.args
    hide_system_copies()
    if options.sleep_in_write:
        sleep_in_checkpoint_writes(options.sleep_in_write)
    if options.weights_dir:
        record_weights(options.weights_dir)
    from cpl_cert.cli import main as cli_main

    sys.argv = ["cpl-cert", *args]
    cli_main()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
