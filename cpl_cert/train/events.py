"""What a training run reports while it runs: one small dataclass per event, passed to ``on_event``.

The library never prints; ``cpl-cert train`` renders these events (progress bar, one line per epoch).
Only the main process (rank 0) reports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EpochStats:
    """One epoch's figures; also one line of the JSON-lines log."""

    epoch: int
    step: int
    lr: float
    train_loss: float
    train_accuracy: float
    clean_accuracy: float
    certified: dict[str, float]
    lipschitz_upper: float
    epoch_seconds: float
    images_per_second: float
    eval_seconds: float
    eval_n: int


@dataclass(frozen=True)
class RunStarted:
    """The run is set up and about to train its first (or next) epoch."""

    model: str
    parameters: int
    train_images: int
    dataset: str
    epochs: int
    steps_per_epoch: int
    loss: str
    optimizer: str
    lr: float
    augmentation: str
    device: str
    world_size: int


@dataclass(frozen=True)
class Resumed:
    """The run continues the one saved in ``path`` after ``epoch`` (global step ``step``)."""

    path: Path
    epoch: int
    step: int


@dataclass(frozen=True)
class Preparing:
    """The run is setting up: ``stage`` is ``"data"`` (loading the splits) or ``"resume"`` (reading the checkpoint)."""

    stage: str


@dataclass(frozen=True)
class LimitAboveData:
    """``limit_train`` (``split`` train) or ``eval_limit`` (``split`` test) asked for more points than the
    split holds: the run uses all ``available`` of them."""

    split: str
    limit: int
    available: int
    dataset: str


@dataclass(frozen=True)
class Cleaned:
    """Temporary files that an interrupted checkpoint write left (``kill -9``) were removed."""

    paths: tuple[Path, ...]


@dataclass(frozen=True)
class AlreadyFinished:
    """The run saved in ``path`` already completed all its ``epochs``: nothing to do."""

    path: Path
    epochs: int


@dataclass(frozen=True)
class EpochStarted:
    epoch: int
    steps: int


@dataclass(frozen=True)
class StepDone:
    """``step`` of the epoch's ``steps`` optimiser steps are done (no host sync is made to report it)."""

    epoch: int
    step: int
    steps: int


@dataclass(frozen=True)
class Evaluating:
    """The epoch's evaluation is in ``stage``: ``"freeze"`` (Lanczos steps on the reported sigma, ``total`` at most per layer),
    then certification stages ``"float32"`` and ``"float64"`` (``done`` of ``total`` points)."""

    epoch: int
    stage: str
    done: int
    total: int


@dataclass(frozen=True)
class Saving:
    """The checkpoint is being written to ``path`` after ``epoch``."""

    path: Path
    epoch: int


@dataclass(frozen=True)
class Saved:
    """The checkpoint (frozen model plus resume state) was written to ``path`` after ``epoch``."""

    path: Path
    epoch: int


@dataclass(frozen=True)
class EpochEnded:
    """The epoch is trained and evaluated (and saved when ``saved``)."""

    stats: EpochStats
    epochs: int
    saved: bool


@dataclass(frozen=True)
class Stopped:
    """The run stopped after ``epoch`` as asked (``stop_after``); ``resume`` continues it."""

    epoch: int


TrainEvent = (
    Preparing | LimitAboveData | Cleaned | RunStarted | Resumed | AlreadyFinished | EpochStarted | StepDone | Evaluating | Saving | Saved
    | EpochEnded | Stopped
)
OnEvent = Callable[[TrainEvent], None]


def ignore(event: TrainEvent) -> None:
    """The default ``on_event``: report nothing."""
