"""``train(TrainOptions(...))``: the CPL paper's recipe, evaluated every epoch, resumable, optionally distributed.

Each epoch trains (``epoch.run_epoch``), then a frozen copy is certified on the test split
(``evaluate.evaluate_epoch``) and written atomically with the resume state (``save.save_run``). Under
``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in DDP with ``broadcast_buffers`` so the
power-iteration vectors stay identical on every rank; each rank trains on its shard of every epoch;
only rank 0 evaluates, writes and reports. See docs/train.md.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..device import resolve_device
from ..errors import CplCertError
from ..files import remove_stale_temporaries
from . import distributed as dist_utils
from .epoch import run_epoch
from .evaluate import evaluate_epoch
from .events import (
    AlreadyFinished,
    Cleaned,
    EpochEnded,
    EpochStarted,
    EpochStats,
    LimitAboveData,
    OnEvent,
    Preparing,
    RunStarted,
    Saved,
    Saving,
    Stopped,
    ignore,
)
from .options import TrainOptions, check_options
from .save import append_log, log_path, make_folder, save_run
from .setup import Run, build_run, preflight, prepare_training, resume_if_asked


@dataclass
class TrainResult:
    """What ``train`` returns: the checkpoint, the per-epoch history and the total wall time."""

    out: Path
    history: list[EpochStats] = field(default_factory=list)
    wall_seconds: float = 0.0
    stopped_early: bool = False


def _check_out(opts: TrainOptions) -> None:
    """Refuse to overwrite an existing checkpoint unless asked, to resume one that does not exist (a mistyped
    ``--out`` must not start a new run silently), and an ``--out`` no folder could hold. Missing folders are
    created with the first write (``make_folder``), so a run that fails before it leaves nothing behind."""
    out = Path(opts.out)
    if out.is_dir():
        raise CplCertError(f"cannot write {out}: it is a folder")
    if out.exists() and not opts.resume and not opts.overwrite:
        raise CplCertError(f"{out} already exists; pass --resume to continue that run or --overwrite to start over")
    if opts.resume and not out.exists():
        raise CplCertError(f"there is no run to resume: {out} does not exist; check --out, or leave out --resume to start a new run")
    existing = next(folder for folder in (out.parent, *out.parent.parents) if folder.exists())
    if not existing.is_dir():
        raise CplCertError(f"cannot write {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CplCertError(f"cannot write {out}: the folder {existing} is not writable")


def _remove_leftovers(out: Path) -> tuple[Path, ...]:
    """Temporary files of the checkpoint and its log that a killed write left behind, removed."""
    return tuple(remove_stale_temporaries(out) + remove_stale_temporaries(log_path(out)))


def train(opts: TrainOptions, on_event: OnEvent | None = None) -> TrainResult:
    """Train, evaluate and checkpoint as ``opts`` says; raises ``CplCertError`` on bad input or divergence.

    ``on_event`` receives the run's progress (``cpl_cert.train.events``) on the main process.
    """
    info = dist_utils.env_info()
    check_options(opts, info.world_size)
    report = on_event if (on_event is not None and info.is_main) else ignore
    if info.is_main:
        _check_out(opts)
        leftovers = _remove_leftovers(Path(opts.out))
        if leftovers:
            report(Cleaned(leftovers))
    preflight(opts, info.world_size)
    device = dist_utils.setup(info, resolve_device(opts.device))
    report(Preparing("data"))
    try:
        return _train(build_run(opts, info, device), report)
    finally:
        dist_utils.teardown(info)


def _started(run: Run) -> RunStarted:
    opts = run.opts
    return RunStarted(
        model=run.config.preset or "custom", parameters=sum(p.numel() for p in run.model.parameters()),
        train_images=len(run.train_data), dataset=opts.dataset, epochs=opts.epochs,
        steps_per_epoch=run.layout.steps_per_epoch, loss=opts.loss, optimizer=opts.optimizer, lr=opts.lr,
        augmentation=run.augment.describe(), device=str(run.device), world_size=run.info.world_size,
    )


def _limits_above_data(run: Run) -> list[LimitAboveData]:
    """A ``limit_train`` or ``eval_limit`` larger than its split (the run uses the whole split)."""
    asked = (("train", run.opts.limit_train, run.train_data), ("test", run.opts.eval_limit, run.test_data))
    return [LimitAboveData(split, limit, len(data), run.opts.dataset) for split, limit, data in asked if limit is not None and limit > len(data)]


def _train(run: Run, on_event: OnEvent) -> TrainResult:
    run.started = time.perf_counter()
    for note in _limits_above_data(run):
        on_event(note)
    resume_if_asked(run, on_event)
    if run.start_epoch >= run.opts.epochs:
        on_event(AlreadyFinished(run.out, run.opts.epochs))
        return TrainResult(run.out, wall_seconds=run.wall_before)
    prepare_training(run)
    on_event(_started(run))
    result = TrainResult(run.out)
    for epoch in range(run.start_epoch + 1, run.opts.epochs + 1):
        on_event(EpochStarted(epoch, run.layout.steps_per_epoch))
        stats = _finish_epoch(run, epoch, on_event)
        if stats is not None:
            result.history.append(stats)
        dist_utils.barrier(run.info)
        if run.opts.stop_after is not None and run.opts.stop_after <= epoch < run.opts.epochs:
            on_event(Stopped(epoch))
            result.stopped_early = True
            break
    result.wall_seconds = run.wall_seconds()
    return result


def _finish_epoch(run: Run, epoch: int, on_event: OnEvent) -> EpochStats | None:
    """Train one epoch, then (main process) evaluate, log and save it; returns its stats on the main process."""
    totals = run_epoch(run, epoch, on_event)
    opts = run.opts
    save_now = epoch % opts.save_every == 0 or epoch == opts.epochs or epoch == opts.stop_after
    if save_now and not dist_utils.weights_match(list(run.model.state_dict().values()), run.info):
        raise CplCertError(f"the model weights differ between processes after epoch {epoch}; refusing to save an inconsistent checkpoint")
    if not run.info.is_main:
        return None
    frozen, stats = evaluate_epoch(run, epoch, totals, on_event)
    make_folder(run.out.parent)
    append_log(run.log, stats)
    if save_now:
        on_event(Saving(run.out, epoch))
        save_run(run, frozen, stats)
        on_event(Saved(run.out, epoch))
    on_event(EpochEnded(stats, opts.epochs, save_now))
    return stats
