"""Writing a run's results: the checkpoint with its ``training`` metadata, and the JSON-lines log."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..checkpoint import save_checkpoint
from ..errors import CplCertError
from ..files import atomic_write
from ..models import CPLNet
from ..version import __version__
from .events import EpochStats
from .resume import resume_tensors

if TYPE_CHECKING:
    from .setup import Run

SCHEDULE = "triangular per step (0 -> peak at 40% -> peak/20 at 80% -> 0)"


def log_path(out: Path) -> Path:
    """The JSON-lines log beside the checkpoint: ``<out>.log.jsonl``."""
    return out.with_name(out.name + ".log.jsonl")


def make_folder(folder: Path) -> None:
    """Create the run's folder (and its parents) just before its first file is written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CplCertError(f"cannot create the folder {folder} ({exc.strerror or exc})") from None


def append_log(path: Path, stats: EpochStats) -> None:
    """Add one epoch's line to the log, flushed to disk."""
    with open(path, "a") as handle:
        handle.write(json.dumps(asdict(stats), sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def truncate_log(path: Path, epoch: int) -> None:
    """Keep the log lines of epochs ``<= epoch`` (those after the checkpoint will be re-run)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("epoch", 0) <= epoch]
    atomic_write(path, "".join(line + "\n" for line in lines))


def versions() -> dict[str, str]:
    """The library versions a checkpoint records."""
    import safetensors

    return {"cpl_cert": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__, "python": platform.python_version()}


def training_metadata(run: Run, stats: EpochStats, wall: float) -> dict[str, Any]:
    """The checkpoint's ``training`` entry: the recipe, the data, the results so far and the command."""
    opts = run.opts
    loss = {"margin": opts.margin} if opts.loss.endswith("hinge") else {"offset": opts.offset, "temperature": opts.temperature}
    return {
        "epochs": opts.epochs, "epochs_completed": stats.epoch, "seed": opts.seed,
        "loss": {"name": opts.loss, **loss},
        "optimizer": {"name": opts.optimizer, "lr": opts.lr, "weight_decay": opts.weight_decay, "schedule": SCHEDULE},
        "batch_size": opts.batch_size, "augmentation": run.augment.describe(), "train_images": len(run.train_data),
        "clean_accuracy": stats.clean_accuracy, "certified": stats.certified, "eval_n": stats.eval_n,
        "lipschitz_upper": stats.lipschitz_upper, "wall_seconds": wall, "versions": versions(),
        "device": str(run.device), "world_size": run.info.world_size, "command": opts.command,
        "args": opts.record(run.info.world_size),
    }


def save_run(run: Run, frozen: CPLNet, stats: EpochStats) -> None:
    """Write the frozen model, its metadata and the live training state to ``out``, atomically."""
    wall = run.wall_seconds()
    extra = resume_tensors(run.model, run.optimizer, stats.epoch, run.global_step, wall)
    save_checkpoint(frozen, run.out, dataset=run.train_data.metadata(), training=training_metadata(run, stats, wall), extra_tensors=extra)
    run.last_saved = stats.epoch
