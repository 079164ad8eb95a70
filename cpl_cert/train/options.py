"""What a training run is asked to do: ``TrainOptions`` (defaults are the paper's recipe) and their check."""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import CplCertError
from ..files import portable_dataset, portable_path

OPTIMIZERS = ("adam", "sgd")

RESUME_KEYS = (
    "dataset", "epochs", "loss", "margin", "offset", "temperature", "optimizer", "lr", "momentum",
    "weight_decay", "batch_size", "augment", "seed", "limit_train", "world_size",
)
"""Options whose change makes a resume meaningless (checked against the checkpoint's record)."""


@dataclass(frozen=True)
class TrainOptions:
    """Everything a training run needs; the defaults are the paper's recipe. ``cpl-cert train`` takes
    its defaults from here. Architecture overrides (``conv_depth`` ... ``head``) replace the preset's."""

    out: Path
    model: str = "cpl-xs"
    dataset: str = "fashion-mnist"
    epochs: int = 10
    loss: str = "hinge"
    margin: float = 0.7
    offset: float = 2.1213
    temperature: float = 0.25
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 256
    augment: str = "auto"
    seed: int = 0
    device: str = "auto"
    std_normalize: bool = False
    conv_depth: int | None = None
    channels: int | None = None
    dense_depth: int | None = None
    dense_inner: int | None = None
    conv_inner: int | None = None
    head: str | None = None
    data_dir: Path | None = None
    limit_train: int | None = None
    eval_limit: int | None = None
    save_every: int = 1
    resume: bool = False
    overwrite: bool = False
    compile: bool = False
    bf16: bool = False
    stop_after: int | None = None
    freeze_iters: int | None = None
    command: str = ""

    def record(self, world_size: int) -> dict[str, Any]:
        """JSON-friendly copy for the checkpoint's ``training.args``, with the number of processes. Paths are
        recorded as ``portable_path`` gives them: no absolute path of the training machine leaves with the file."""
        args = {k: (portable_path(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        return {**args, "dataset": portable_dataset(self.dataset), "world_size": world_size}


def default_options() -> dict[str, Any]:
    """Every option's default, by name (the command line shows and uses these)."""
    return {f.name: f.default for f in fields(TrainOptions) if f.default is not MISSING}


def check_options(opts: TrainOptions, world_size: int) -> None:
    """Refuse, with one sentence, options no run can use (loss, augmentation and model names are
    checked where they are built)."""
    problems = [
        (opts.epochs < 1, f"--epochs must be at least 1, got {opts.epochs}"),
        (opts.batch_size < 1, f"--batch-size must be positive, got {opts.batch_size}"),
        (opts.batch_size % world_size != 0, f"--batch-size ({opts.batch_size}) must be a multiple of the number of processes ({world_size})"),
        (not (opts.lr > 0 and math.isfinite(opts.lr)), f"--lr must be positive, got {opts.lr}"),
        (opts.optimizer not in OPTIMIZERS, f"unknown optimizer {opts.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"),
        (opts.save_every < 1, f"--save-every must be at least 1, got {opts.save_every}"),
        (opts.limit_train is not None and opts.limit_train < 1, "--train-limit must be a positive number of images"),
        (opts.eval_limit is not None and opts.eval_limit < 1, "--eval-limit must be a positive number of images"),
        (opts.stop_after is not None and opts.stop_after < 1, "--stop-after must be at least 1"),
        (opts.freeze_iters is not None and opts.freeze_iters < 1, "--freeze-iters must be at least 1"),
    ]
    for failed, message in problems:
        if failed:
            raise CplCertError(message)
