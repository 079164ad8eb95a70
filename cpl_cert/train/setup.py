"""Setting a run up: data, model, optimiser, loss, augmentation, resume state, DDP and compile."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import DatasetSpec, ImageDataset, check_name, load_dataset
from ..eps import EpsValue, parse_eps
from ..errors import CplCertError
from ..models import PRESETS, CPLNet, ModelConfig, resolve_config
from . import distributed as dist_utils
from .augment import Augment, make_augment
from .events import OnEvent, Preparing, Resumed
from .losses import LossFn, check_loss, make_loss
from .options import TrainOptions
from .resume import check_resumable, restore_resume_state
from .save import log_path, truncate_log


@dataclass(frozen=True)
class BatchLayout:
    """How the training set is cut: ``used`` images (a multiple of the world size), ``per_rank`` of
    them on each process, ``rank_batch`` per step and process, ``steps_per_epoch`` steps per epoch."""

    used: int
    per_rank: int
    rank_batch: int
    steps_per_epoch: int
    total_steps: int


@dataclass
class Run:
    """A training run in progress: what it was asked, what it built, and where it stands."""

    opts: TrainOptions
    info: dist_utils.DistInfo
    device: torch.device
    train_data: ImageDataset
    test_data: ImageDataset
    eps: list[EpsValue]
    config: ModelConfig
    model: CPLNet
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    augment: Augment
    step_model: nn.Module | None = None
    layout: BatchLayout | None = None
    images: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    start_epoch: int = 0
    global_step: int = 0
    wall_before: float = 0.0
    last_saved: int = 0
    started: float = 0.0

    @property
    def out(self) -> Path:
        return Path(self.opts.out)

    @property
    def log(self) -> Path:
        return log_path(self.out)

    def wall_seconds(self) -> float:
        """Training time so far, the time of the runs this one resumes included."""
        return self.wall_before + time.perf_counter() - self.started

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.opts.bf16)


def model_config(opts: TrainOptions, data: ImageDataset | DatasetSpec) -> ModelConfig:
    """The architecture: the preset with any custom sizes, the dataset's shape and mean-only normalisation."""
    return resolve_config(
        opts.model,
        input_shape=tuple(data.input_shape),
        num_classes=len(data.classes),
        conv_depth=opts.conv_depth,
        channels=opts.channels,
        dense_depth=opts.dense_depth,
        dense_inner=opts.dense_inner,
        conv_inner=opts.conv_inner,
        head=opts.head,
        mean=tuple(data.mean),
        std=tuple(data.std) if opts.std_normalize else None,
    )


def preflight(opts: TrainOptions, world_size: int) -> None:
    """Names, sizes and a resumed run's architecture, checked before any data is loaded or downloaded."""
    check_loss(opts.loss, opts.margin, opts.offset, opts.temperature)
    spec = check_name(opts.dataset)
    if spec is None:  # folder:PATH: its shape is known once its images are read
        if opts.model not in PRESETS:
            raise CplCertError(f"unknown preset {opts.model!r}; choose one of {', '.join(PRESETS)}")
        make_augment(opts.augment, (3, 32, 32))
        return
    make_augment(opts.augment, spec.input_shape)
    config = model_config(opts, spec)
    if opts.resume:
        check_resumable(Path(opts.out), opts.record(world_size), config)


def make_optimizer(opts: TrainOptions, params: Any) -> torch.optim.Optimizer:
    """Adam, or SGD with Nesterov momentum (when the momentum is positive)."""
    if opts.optimizer == "sgd":
        return torch.optim.SGD(params, lr=opts.lr, momentum=opts.momentum, weight_decay=opts.weight_decay, nesterov=opts.momentum > 0)
    return torch.optim.Adam(params, lr=opts.lr, weight_decay=opts.weight_decay)


def batch_layout(n: int, world_size: int, batch_size: int, epochs: int) -> BatchLayout:
    """Each process gets an equal share of every epoch; the last step of an epoch may be smaller."""
    used = n - n % world_size
    per_rank = used // world_size
    rank_batch = batch_size // world_size
    steps = math.ceil(per_rank / rank_batch)
    return BatchLayout(used, per_rank, rank_batch, steps, steps * epochs)


def build_run(opts: TrainOptions, info: dist_utils.DistInfo, device: torch.device) -> Run:
    """Data, model (seeded), optimiser, loss and augmentation for ``opts``; nothing trained yet."""
    train_data = load_dataset(opts.dataset, "train", opts.data_dir).subset(opts.limit_train)
    test_data = load_dataset(opts.dataset, "test", opts.data_dir).subset(opts.eval_limit)
    config = model_config(opts, train_data)
    augment = make_augment(opts.augment, config.input_shape)
    torch.manual_seed(opts.seed)
    model = CPLNet(config).to(device)
    optimizer = make_optimizer(opts, model.parameters())
    loss_fn = make_loss(opts.loss, opts.margin, opts.offset, opts.temperature, head=model.head)
    eps = parse_eps(list(test_data.default_eps))
    return Run(opts, info, device, train_data, test_data, eps, config, model, optimizer, loss_fn, augment)


def resume_if_asked(run: Run, on_event: OnEvent) -> None:
    """With ``resume`` (``train`` has checked that ``out`` exists): check it fits, load its state; then trim the log."""
    if run.opts.resume:
        on_event(Preparing("resume"))
        check_resumable(run.out, run.opts.record(run.info.world_size), run.config)
        run.start_epoch, run.global_step, run.wall_before = restore_resume_state(run.out, run.model, run.optimizer)
        run.last_saved = run.start_epoch
        run.model.to(run.device)
        on_event(Resumed(run.out, run.start_epoch, run.global_step))
    if run.info.is_main:
        if run.start_epoch == 0:
            run.log.unlink(missing_ok=True)
        else:
            truncate_log(run.log, run.start_epoch)


def prepare_training(run: Run) -> None:
    """Move the training data to the device, lay out the batches, wrap the model for DDP / compile."""
    run.images = run.train_data.images.to(run.device)
    run.labels = run.train_data.labels.to(run.device)
    run.layout = batch_layout(len(run.train_data), run.info.world_size, run.opts.batch_size, run.opts.epochs)
    step_model: nn.Module = run.model
    if run.info.enabled:
        device_ids = [run.device.index] if run.device.type == "cuda" else None
        step_model = nn.parallel.DistributedDataParallel(run.model, device_ids=device_ids, broadcast_buffers=True)
    if run.opts.compile:
        step_model = torch.compile(step_model)
    run.step_model = step_model
