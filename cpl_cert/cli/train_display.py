"""How ``cpl-cert train`` shows a run: a Rich progress bar per epoch and one line per event."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..train.events import (
    AlreadyFinished,
    EpochEnded,
    EpochStarted,
    NothingToResume,
    Resumed,
    RunStarted,
    StepDone,
    Stopped,
    TrainEvent,
)


def describe(event: TrainEvent) -> str | None:
    """The line a person reads for ``event`` (``None`` for events shown only on the progress bar)."""
    if isinstance(event, RunStarted):
        return (
            f"training {event.model} ({event.parameters:,} parameters) on {event.train_images:,} {event.dataset} images, "
            f"{event.epochs} epochs x {event.steps_per_epoch} steps, {event.loss} loss, {event.optimizer} lr {event.lr:g}, "
            f"augmentation: {event.augmentation}, device {event.device}"
            + (f", {event.world_size} processes" if event.world_size > 1 else "")
        )
    if isinstance(event, EpochEnded):
        s = event.stats
        certs = "  ".join(f"{k}: {v:6.2%}" for k, v in s.certified.items())
        return (
            f"epoch {s.epoch:>3}/{event.epochs}  loss {s.train_loss:.4f}  train {s.train_accuracy:6.2%}  "
            f"clean {s.clean_accuracy:6.2%}  {certs}  L<={s.lipschitz_upper:.4f}  "
            f"{s.epoch_seconds:.1f} s  {s.images_per_second:,.0f} img/s" + ("  saved" if event.saved else "")
        )
    if isinstance(event, Resumed):
        return f"resuming {event.path} after epoch {event.epoch} (step {event.step})"
    if isinstance(event, NothingToResume):
        return f"note: {event.path} does not exist yet, so --resume starts a new run"
    if isinstance(event, AlreadyFinished):
        return f"{event.path} already finished all {event.epochs} epochs; nothing to do"
    if isinstance(event, Stopped):
        return f"stopped after epoch {event.epoch} as asked; continue with --resume"
    return None


class TrainDisplay:
    """An ``on_event`` for ``cpl_cert.train.train``; use as a context manager so the bar is cleaned up."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.task: TaskID | None = None

    def __enter__(self) -> TrainDisplay:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def _bar(self) -> Progress:
        if self.progress is None:
            self.progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), console=self.console, transient=True,
            )
            self.progress.start()
        return self.progress

    def __call__(self, event: TrainEvent) -> None:
        if isinstance(event, EpochStarted):
            self.task = self._bar().add_task("train", total=event.steps, epoch=event.epoch)
        elif isinstance(event, StepDone) and self.task is not None:
            self._bar().update(self.task, completed=event.step)
        elif isinstance(event, EpochEnded) and self.task is not None:
            self._bar().remove_task(self.task)
            self.task = None
        line = describe(event)
        if line is not None:
            self.console.print(line, highlight=False)
