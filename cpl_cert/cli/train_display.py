"""How ``cpl-cert train`` shows a run: what it does now (epoch k/N, evaluation, saving) with the time left for
the epoch and for the whole run, one result line per epoch, and which checkpoint survives an interrupt."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from ..train.events import (
    AlreadyFinished,
    Cleaned,
    EpochEnded,
    EpochStarted,
    Evaluating,
    LimitAboveData,
    Preparing,
    Resumed,
    RunStarted,
    Saved,
    Saving,
    StepDone,
    Stopped,
    TrainEvent,
)
from .common import count, note_limit
from .interrupt import describe as describe_interrupt
from .progress import Activity


def describe(event: TrainEvent) -> str | None:
    """The line a person reads for ``event`` (``None`` for events shown only as progress)."""
    if isinstance(event, RunStarted):
        return (
            f"training {event.model} ({count(event.parameters, 'parameter')}) on {count(event.train_images, event.dataset + ' image')}, "
            f"{count(event.epochs, 'epoch')} x {count(event.steps_per_epoch, 'step')}, {event.loss} loss, {event.optimizer} lr {event.lr:g}, "
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
    if isinstance(event, AlreadyFinished):
        return f"{event.path} already finished {'its' if event.epochs == 1 else 'all'} {count(event.epochs, 'epoch')}; nothing to do"
    if isinstance(event, Stopped):
        return f"stopped after epoch {event.epoch} as asked; continue with --resume"
    if isinstance(event, Cleaned):
        return f"removed {len(event.paths)} temporary file(s) left by an interrupted checkpoint write: {', '.join(p.name for p in event.paths)}"
    return None


def stage_text(event: Evaluating, epochs: int) -> str:
    """What the epoch's evaluation is doing, in words."""
    head = f"epoch {event.epoch}/{epochs}:"
    if event.stage == "freeze":
        what = "the final model" if event.epoch == epochs else "a copy for evaluation"
        return f"{head} freezing {what} (certified bounds, {event.total} report iterations)"
    if event.stage == "float32":
        return f"{head} certifying {event.total:,} test images"
    return f"{head} re-evaluating {event.total:,} undecided points in float64"


class RunClock:
    """Time left for the whole run: training steps at this run's average rate plus each epoch's evaluation."""

    def __init__(self, epochs: int, steps: int) -> None:
        self.epochs, self.steps = epochs, steps
        self.step_seconds: list[float] = []
        self.eval_seconds: list[float] = []
        self.last_step: float | None = None

    def step(self, step: int) -> None:
        now = time.monotonic()
        if self.last_step is not None and step > 1:
            self.step_seconds.append(now - self.last_step)
        self.last_step = now

    def epoch_ended(self) -> None:
        if self.last_step is not None:
            self.eval_seconds.append(time.monotonic() - self.last_step)
        self.last_step = None

    def _per_step(self) -> float:
        recent = self.step_seconds[-200:]
        return sum(recent) / len(recent)

    def _per_eval(self) -> float | None:
        return sum(self.eval_seconds) / len(self.eval_seconds) if self.eval_seconds else None

    def remaining(self, epoch: int, step: int) -> float | None:
        """Seconds left after ``step`` of ``epoch`` (evaluation counted once it has been measured)."""
        if not self.step_seconds:
            return None
        steps_left = (self.steps - step) + (self.epochs - epoch) * self.steps
        return steps_left * self._per_step() + (self.epochs - epoch + 1) * (self._per_eval() or 0.0)

    def remaining_in_evaluation(self, epoch: int, stage_left: float | None) -> float | None:
        """Seconds left while ``epoch`` is evaluated: the rest of this evaluation (the measured average less the
        time spent, or the evaluation line's own estimate ``stage_left``, whichever is longer), then the epochs
        after it. ``None`` when nothing tells (the first evaluation's freezing stage): unknown, never 0."""
        if not self.step_seconds or self.last_step is None:
            return None
        spent = time.monotonic() - self.last_step
        average = self._per_eval()
        known = [t for t in (None if average is None else average - spent, stage_left) if t is not None and t > 0]
        if not known:
            return None
        this = max(known)
        per_eval = average if average is not None else spent + this
        return this + (self.epochs - epoch) * (self.steps * self._per_step() + per_eval)


class TrainDisplay:
    """An ``on_event`` for ``cpl_cert.train.train`` (a context manager): progress on ``err``, results on ``out``."""

    def __init__(self, out: Console, err: Console) -> None:
        self.activity = Activity(err, out=out)
        self.epochs = 0
        self.clock: RunClock | None = None
        self.saved_epoch: int | None = None

    def __enter__(self) -> TrainDisplay:
        self.activity.__enter__()
        self.activity.stage("checking the options")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.activity.__exit__(*exc)

    def __call__(self, event: TrainEvent) -> None:
        if isinstance(event, (Resumed, Saved)):
            self.saved_epoch = event.epoch
        if isinstance(event, (StepDone, EpochStarted, EpochEnded)):
            self._progress(event)
        elif isinstance(event, Preparing):
            self.activity.stage("loading the training and test data" if event.stage == "data" else "reading the checkpoint to resume")
        elif isinstance(event, Evaluating):
            if event.done == 0:
                self.activity.stage(stage_text(event, self.epochs), event.total if event.stage != "freeze" else None)
            self.activity.update(event.done)
            self._evaluation_left(event.epoch)
        elif isinstance(event, Saving):
            self.activity.stage(f"epoch {event.epoch}/{self.epochs}: writing {event.path}")
        elif isinstance(event, RunStarted):
            self.epochs, self.clock = event.epochs, RunClock(event.epochs, event.steps_per_epoch)
        elif isinstance(event, LimitAboveData):
            option = "--train-limit" if event.split == "train" else "--eval-limit"
            note_limit(option, event.limit, event.available, f"{event.dataset} {event.split} split")
        line = describe(event)
        if line is not None:
            self.activity.print(line, highlight=False, soft_wrap=True)

    def _progress(self, event: StepDone | EpochStarted | EpochEnded) -> None:
        """The epoch line (its steps) and the run line (epoch k/N, time left for the whole run)."""
        assert self.clock is not None
        if isinstance(event, EpochEnded):
            self.clock.epoch_ended()
            return
        if isinstance(event, EpochStarted):
            self.activity.stage(f"epoch {event.epoch}/{self.epochs}: training", event.steps)
            if "run" not in self.activity.lines:
                self.activity.stage("whole run", self.epochs, key="run")
            step = 0
        else:
            self.clock.step(event.step)
            self.activity.update(event.step)
            step = event.step
        left = self.clock.remaining(event.epoch, step)
        self.activity.update(
            event.epoch - 1 + step / self.clock.steps, key="run", count=f"epoch {event.epoch}/{self.epochs}",
            finish_at=None if left is None else time.monotonic() + left,
        )

    def _evaluation_left(self, epoch: int) -> None:
        """The run line during an evaluation: its time left keeps moving (it stood at 0:00:00 through the last one)."""
        if self.clock is None or "run" not in self.activity.lines:
            return
        left = self.clock.remaining_in_evaluation(epoch, self.activity.lines["stage"].remaining())
        self.activity.update(epoch, key="run", finish_at=math.inf if left is None else time.monotonic() + left)

    def interrupted(self, exc: BaseException, out: Path, resume: bool) -> str:
        """The sentence for an interrupt: which epoch the checkpoint holds and how to continue."""
        what = describe_interrupt(exc)
        if self.saved_epoch is not None:
            return f"{what}; {out} holds epoch {self.saved_epoch}; continue with the same command{'' if resume else ' and --resume'}"
        if resume:
            return f"{what}; {out} is unchanged; continue with the same command"
        return f"{what} before the first checkpoint was written; start again with the same command"
