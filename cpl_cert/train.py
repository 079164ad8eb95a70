"""The training loop: the CPL paper's recipe, evaluated every epoch, resumable, optionally distributed.

``train(TrainOptions(...))`` is what ``cpl-cert train`` runs. Design points (see docs/train.md):

* Data live on the device as uint8; augmentation runs there; nothing syncs with the host per step
  (loss, accuracy and the NaN/inf guard accumulate on the device and are read every ``GUARD_EVERY`` steps).
* Each epoch ends with a frozen deep copy of the model (the live training state is untouched),
  certified on the test split and written atomically as the checkpoint. The checkpoint also holds the
  resume state under ``extra.``: the live (unfrozen) power-iteration vectors, the optimiser state,
  the RNG state and the epoch/step counters. Shuffling and augmentation draw from generators re-seeded
  from (seed, epoch, rank) at each epoch, so a resumed run continues exactly as if never stopped.
* Under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in DDP with ``broadcast_buffers`` so the
  power-iteration vectors stay identical on every rank; each rank trains on its shard of every epoch;
  only rank 0 evaluates, logs and writes.

Test hooks (environment variables, for the test-suite only): ``CPL_CERT_FAULT_NAN_AT_STEP=k`` makes the
loss of global step ``k`` NaN; ``CPL_CERT_TEST_WEIGHTS_DIR=D`` makes every rank write the SHA-256 of its
final weights to ``D/rank<r>.txt``; ``CPL_CERT_FAULT_SLEEP_IN_WRITE`` is in ``cpl_cert.checkpoint``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file
from torch import nn

from . import __version__
from . import distributed as dist_utils
from .augment import make_augment
from .certify import certify, parse_eps
from .checkpoint import atomic_write, read_metadata, save_checkpoint
from .data import ImageDataset, load_dataset, to_float_images
from .device import resolve_device
from .errors import CplCertError
from .losses import make_loss
from .models import CPLNet, ModelConfig, resolve_config
from .schedule import triangular_lr
from .spectral import freeze

FREEZE_ITERS = 2000
"""Power iterations (at most) when freezing the final model: to convergence, as ``cpl_cert.freeze`` does."""

EVAL_FREEZE_ITERS = 100
"""Power iterations when freezing the per-epoch copy. Sound with any count: ``freeze`` uses
``max(sigma_power, sigma_upper)`` (a certified bound), so fewer iterations only cost speed, not validity.
The final epoch is frozen with the library default (to convergence)."""

GUARD_EVERY = 25
"""Steps between two reads of the on-device NaN/inf flag (the only host syncs inside an epoch)."""

OPTIMIZERS = ("adam", "sgd")

# Options whose change makes a resume meaningless (checked against the checkpoint's record).
RESUME_KEYS = (
    "dataset", "epochs", "loss", "margin", "offset", "temperature", "optimizer", "lr", "momentum",
    "weight_decay", "batch_size", "augment", "seed", "limit_train", "world_size",
)


@dataclass
class TrainOptions:
    """Everything a training run needs; the defaults are the paper's recipe."""

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
    depth: int | None = None
    channels: int | None = None
    dense_depth: int | None = None
    dense_width: int | None = None
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
    world_size: int = 1

    def record(self) -> dict[str, Any]:
        """JSON-friendly copy for the checkpoint's ``training.args``."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass
class EpochStats:
    """One line of the training log."""

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


@dataclass
class TrainResult:
    """What ``train`` returns: the checkpoint, the per-epoch history and the total wall time."""

    out: Path
    history: list[EpochStats] = field(default_factory=list)
    wall_seconds: float = 0.0
    stopped_early: bool = False


class NonFiniteLoss(CplCertError):
    """The loss became NaN or infinite; the message names the epoch and step."""


def log_path(out: Path) -> Path:
    """The JSON-lines log beside the checkpoint: ``<out>.log.jsonl``."""
    return out.with_name(out.name + ".log.jsonl")


def _versions() -> dict[str, str]:
    import safetensors

    return {"cpl_cert": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__, "python": platform.python_version()}


def _check_options(opts: TrainOptions) -> None:
    problems = [
        (opts.epochs < 1, f"--epochs must be at least 1, got {opts.epochs}"),
        (opts.batch_size < 1, f"--batch-size must be positive, got {opts.batch_size}"),
        (opts.batch_size % opts.world_size != 0, f"--batch-size ({opts.batch_size}) must be a multiple of the number of processes ({opts.world_size})"),
        (not (opts.lr > 0 and math.isfinite(opts.lr)), f"--lr must be positive, got {opts.lr}"),
        (opts.optimizer not in OPTIMIZERS, f"unknown optimizer {opts.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"),
        (opts.save_every < 1, f"--save-every must be at least 1, got {opts.save_every}"),
        (opts.limit_train is not None and opts.limit_train < 1, "--limit-train must be a positive number of images"),
        (opts.eval_limit is not None and opts.eval_limit < 1, "--eval-limit must be a positive number of images"),
        (opts.stop_after is not None and opts.stop_after < 1, "--stop-after must be at least 1"),
        (opts.freeze_iters is not None and opts.freeze_iters < 1, "--freeze-iters must be at least 1"),
    ]
    for failed, message in problems:
        if failed:
            raise CplCertError(message)


def model_config(opts: TrainOptions, data: ImageDataset) -> ModelConfig:
    """The architecture: the preset with any custom sizes, the dataset's shape and mean-only normalisation."""
    return resolve_config(
        opts.model,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        conv_depth=opts.depth,
        channels=opts.channels,
        dense_depth=opts.dense_depth,
        dense_inner=opts.dense_width,
        conv_inner=opts.conv_inner,
        head=opts.head,
        mean=tuple(data.mean),
        std=tuple(data.std) if opts.std_normalize else None,
    )


def make_optimizer(opts: TrainOptions, params: Any) -> torch.optim.Optimizer:
    if opts.optimizer == "sgd":
        return torch.optim.SGD(params, lr=opts.lr, momentum=opts.momentum, weight_decay=opts.weight_decay, nesterov=opts.momentum > 0)
    return torch.optim.Adam(params, lr=opts.lr, weight_decay=opts.weight_decay)


# --- resume state ----------------------------------------------------------------------------------
def resume_tensors(model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, step: int, wall: float) -> dict[str, torch.Tensor]:
    """The training state that freezing would lose, as flat tensors for ``save_checkpoint(extra_tensors=)``."""
    tensors: dict[str, torch.Tensor] = {
        "resume.epoch": torch.tensor([epoch], dtype=torch.int64),
        "resume.step": torch.tensor([step], dtype=torch.int64),
        "resume.wall_seconds": torch.tensor([wall], dtype=torch.float64),
        "rng.torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    for name, buffer in model.named_buffers():
        tensors[f"live.{name}"] = buffer
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors


def restore_resume_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int, float]:
    """Load weights, live buffers, optimiser and RNG state; returns (epoch, global step, wall seconds so far)."""
    tensors = load_file(str(path))  # one read: the frozen weights and the ``extra.`` resume state
    weights = {k: v for k, v in tensors.items() if not k.startswith("extra.")}
    extra = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
    if "resume.epoch" not in extra:
        raise CplCertError(f"{path} holds no resume state (it was not written by cpl-cert train, or was exported); start a new run")
    state = dict(weights)
    for name, _ in model.named_buffers():
        if f"live.{name}" not in extra:
            raise CplCertError(f"{path} lacks the training state of {name}; it cannot be resumed")
        state[name] = extra[f"live.{name}"]
    model.load_state_dict(state)
    optim_state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in extra.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            optim_state.setdefault(int(index), {})[key] = value
    groups = optimizer.state_dict()["param_groups"]
    try:
        optimizer.load_state_dict({"state": optim_state, "param_groups": groups})
    except (ValueError, KeyError) as exc:
        raise CplCertError(f"the optimiser state in {path} does not fit this model ({exc})") from None
    torch.set_rng_state(extra["rng.torch_cpu"])
    if "rng.cuda" in extra and torch.cuda.is_available():
        torch.cuda.set_rng_state(extra["rng.cuda"])
    return int(extra["resume.epoch"][0]), int(extra["resume.step"][0]), float(extra["resume.wall_seconds"][0])


def _check_resumable(path: Path, opts: TrainOptions, config: ModelConfig) -> None:
    meta = read_metadata(path)
    stored = (meta.get("training") or {}).get("args")
    if not isinstance(stored, dict):
        raise CplCertError(f"{path} was not written by cpl-cert train, so it cannot be resumed")
    if meta["config"] != json.loads(config.to_json()):
        raise CplCertError(f"cannot resume {path}: it holds a different architecture than the options ask for")
    mine = opts.record()
    for key in RESUME_KEYS:
        if stored.get(key) != mine.get(key):
            raise CplCertError(f"cannot resume {path}: it was trained with {key}={stored.get(key)!r}, this run asks for {mine.get(key)!r}")


def _truncate_log(path: Path, epoch: int) -> None:
    """Keep the log lines of epochs ``<= epoch`` (those after the checkpoint will be re-run)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("epoch", 0) <= epoch]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in lines)))


def _append_log(path: Path, stats: EpochStats) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(asdict(stats), sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# --- the loop ----------------------------------------------------------------------------------------
def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _progress(enabled: bool) -> Any:
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .commands.common import console

    return Progress(
        TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=console, transient=True,
    )


def train(opts: TrainOptions, echo: Callable[[str], None] | None = None) -> TrainResult:
    """Train, evaluate and checkpoint as ``opts`` says; raises ``CplCertError`` on bad input or divergence."""
    info = dist_utils.env_info()
    opts.world_size = info.world_size
    _check_options(opts)
    say = echo if (echo is not None and info.is_main) else (lambda _msg: None)
    out = Path(opts.out)
    if info.is_main:
        if not out.parent.is_dir():
            raise CplCertError(f"cannot write {out}: the folder {out.parent} does not exist")
        if out.exists() and not opts.resume and not opts.overwrite:
            raise CplCertError(f"{out} already exists; pass --resume to continue that run or --overwrite to start over")
    device = dist_utils.setup(info, resolve_device(opts.device))
    try:
        return _train(opts, info, device, out, say)
    finally:
        dist_utils.teardown(info)


def _train(opts: TrainOptions, info: dist_utils.DistInfo, device: torch.device, out: Path, say: Callable[[str], None]) -> TrainResult:
    started = time.perf_counter()
    train_data = load_dataset(opts.dataset, "train", opts.data_dir).subset(opts.limit_train)
    test_data = load_dataset(opts.dataset, "test", opts.data_dir).subset(opts.eval_limit)
    eps = parse_eps(list(test_data.default_eps))
    config = model_config(opts, train_data)
    torch.manual_seed(opts.seed)
    model = CPLNet(config).to(device)
    optimizer = make_optimizer(opts, model.parameters())
    loss_fn = make_loss(opts.loss, opts.margin, opts.offset, opts.temperature, head=model.head)
    augment = make_augment(opts.augment, config.input_shape)

    start_epoch, global_step, wall_before = 0, 0, 0.0
    log = log_path(out)
    if opts.resume and out.exists():
        _check_resumable(out, opts, config)
        start_epoch, global_step, wall_before = restore_resume_state(out, model, optimizer)
        model.to(device)
        say(f"resuming {out} after epoch {start_epoch} (step {global_step})")
    elif opts.resume:
        say(f"note: {out} does not exist yet, so --resume starts a new run")
    if info.is_main:
        if start_epoch == 0:
            log.unlink(missing_ok=True)
        else:
            _truncate_log(log, start_epoch)
    if start_epoch >= opts.epochs:
        say(f"{out} already finished all {opts.epochs} epochs; nothing to do")
        return TrainResult(out, wall_seconds=wall_before)

    images = train_data.images.to(device)
    labels = train_data.labels.to(device)
    used = len(train_data) - len(train_data) % info.world_size
    per_rank = used // info.world_size
    rank_batch = opts.batch_size // info.world_size
    steps_per_epoch = math.ceil(per_rank / rank_batch)
    total_steps = steps_per_epoch * opts.epochs

    step_model: nn.Module = model
    if info.enabled:
        step_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=True
        )
    if opts.compile:
        step_model = torch.compile(step_model)
    fault_step = int(os.environ.get("CPL_CERT_FAULT_NAN_AT_STEP", "-1"))
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=opts.bf16)

    say(
        f"training {config.preset or 'custom'} ({sum(p.numel() for p in model.parameters()):,} parameters) on "
        f"{len(train_data):,} {opts.dataset} images, {opts.epochs} epochs x {steps_per_epoch} steps, "
        f"{opts.loss} loss, {opts.optimizer} lr {opts.lr:g}, augmentation: {augment.describe()}, device {device}"
        + (f", {info.world_size} processes" if info.enabled else "")
    )
    result = TrainResult(out)
    progress = _progress(info.is_main and opts.epochs > 0)
    last_saved = start_epoch
    if progress is not None:
        progress.start()
    try:
        for epoch in range(start_epoch + 1, opts.epochs + 1):
            model.train()
            shuffle = _generator(device, opts.seed * 1_000_003 + epoch)
            perm = torch.randperm(len(train_data), generator=shuffle, device=device)[:used][info.rank :: info.world_size]
            aug_gen = _generator(device, (opts.seed * 1_000_003 + epoch) * 4099 + info.rank + 1)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            first_bad = torch.full((), -1, dtype=torch.int64, device=device)
            task = progress.add_task("train", total=steps_per_epoch, epoch=epoch) if progress is not None else None
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            epoch_start = time.perf_counter()
            lr = 0.0
            for s in range(steps_per_epoch):
                lr = triangular_lr(global_step, total_steps, opts.lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                index = perm[s * rank_batch : (s + 1) * rank_batch]
                x = to_float_images(augment(images[index], aug_gen))
                y = labels[index]
                with autocast:
                    logits = step_model(x)
                    loss = loss_fn(logits, y)
                if global_step == fault_step:
                    loss = loss * float("nan")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                detached = loss.detach()
                loss_sum += detached.double() * y.shape[0]
                correct += (logits.detach().argmax(dim=1) == y).sum()
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(detached), torch.full_like(first_bad, global_step), first_bad)
                global_step += 1
                if (s + 1) % GUARD_EVERY == 0 or s + 1 == steps_per_epoch:
                    bad = first_bad.clone()
                    if info.enabled:
                        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
                    if int(bad) >= 0:
                        bad_step = int(bad)
                        raise NonFiniteLoss(
                            f"training diverged: the loss became NaN or infinite at epoch {epoch}, step "
                            f"{bad_step - (epoch - 1) * steps_per_epoch + 1} of {steps_per_epoch} (global step {bad_step}); "
                            + (f"the last good checkpoint {out} (epoch {last_saved}) was kept" if last_saved else "no checkpoint had been written yet")
                            + "; try a lower --lr"
                        )
                if progress is not None:
                    progress.advance(task)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            epoch_seconds = time.perf_counter() - epoch_start
            if progress is not None:
                progress.remove_task(task)
            totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(per_rank), dtype=torch.float64, device=device)])
            dist_utils.all_reduce_sum(totals, info)
            train_loss, train_correct, seen = (float(v) for v in totals.cpu())

            save_now = epoch % opts.save_every == 0 or epoch == opts.epochs or epoch == opts.stop_after
            if save_now and not dist_utils.weights_match(list(model.state_dict().values()), info):
                raise CplCertError(f"the model weights differ between processes after epoch {epoch}; refusing to save an inconsistent checkpoint")
            if info.is_main:
                eval_start = time.perf_counter()
                frozen = copy.deepcopy(model)
                final_iters = opts.freeze_iters or FREEZE_ITERS
                freeze(frozen, max_iters=final_iters if epoch == opts.epochs else min(final_iters, EVAL_FREEZE_ITERS))
                cert = certify(frozen, test_data, eps=[e.label for e in eps], device=device, batch_size=1024)
                stats = EpochStats(
                    epoch=epoch, step=global_step, lr=lr, train_loss=train_loss / seen, train_accuracy=train_correct / seen,
                    clean_accuracy=cert.clean_accuracy, certified={e.label: cert.certified_accuracy(e.value) for e in eps},
                    lipschitz_upper=cert.bounds.upper, epoch_seconds=epoch_seconds,
                    images_per_second=seen / epoch_seconds if epoch_seconds > 0 else 0.0,
                    eval_seconds=time.perf_counter() - eval_start, eval_n=cert.n,
                )
                result.history.append(stats)
                _append_log(log, stats)
                wall = wall_before + time.perf_counter() - started
                if save_now:
                    training = {
                        "epochs": opts.epochs, "epochs_completed": epoch, "seed": opts.seed,
                        "loss": {"name": opts.loss, **({"margin": opts.margin} if opts.loss.endswith("hinge") else {"offset": opts.offset, "temperature": opts.temperature})},
                        "optimizer": {"name": opts.optimizer, "lr": opts.lr, "weight_decay": opts.weight_decay, "schedule": "triangular per step (0 -> peak at 40% -> peak/20 at 80% -> 0)"},
                        "batch_size": opts.batch_size, "augmentation": augment.describe(), "train_images": len(train_data),
                        "clean_accuracy": stats.clean_accuracy, "certified": stats.certified, "eval_n": stats.eval_n,
                        "lipschitz_upper": stats.lipschitz_upper, "wall_seconds": wall, "versions": _versions(),
                        "device": str(device), "world_size": info.world_size, "command": opts.command, "args": opts.record(),
                    }
                    save_checkpoint(frozen, out, dataset=train_data.metadata(), training=training,
                                    extra_tensors=resume_tensors(model, optimizer, epoch, global_step, wall))
                    last_saved = epoch
                certs = "  ".join(f"{k}: {v:6.2%}" for k, v in stats.certified.items())
                say(
                    f"epoch {epoch:>3}/{opts.epochs}  loss {stats.train_loss:.4f}  train {stats.train_accuracy:6.2%}  "
                    f"clean {stats.clean_accuracy:6.2%}  {certs}  L<={stats.lipschitz_upper:.4f}  "
                    f"{epoch_seconds:.1f} s  {stats.images_per_second:,.0f} img/s" + ("  saved" if save_now else "")
                )
            dist_utils.barrier(info)
            if opts.stop_after is not None and epoch >= opts.stop_after and epoch < opts.epochs:
                say(f"stopped after epoch {epoch} as asked; continue with --resume")
                result.stopped_early = True
                break
    finally:
        if progress is not None:
            progress.stop()
    weights_dir = os.environ.get("CPL_CERT_TEST_WEIGHTS_DIR")
    if weights_dir:
        Path(weights_dir, f"rank{info.rank}.txt").write_text(_weights_digest(model) + "\n")
    result.wall_seconds = wall_before + time.perf_counter() - started
    return result
