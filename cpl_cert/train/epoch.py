"""One training epoch: shuffled shards, on-device augmentation, the per-step schedule, the NaN/inf guard.

Nothing syncs with the host per step: loss, accuracy and the first non-finite step accumulate on the
device and are read every ``GUARD_EVERY`` steps (the only host syncs inside an epoch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..data import to_float_images
from ..errors import CplCertError
from . import distributed as dist_utils
from .events import OnEvent, StepDone
from .schedule import triangular_lr
from .setup import Run

GUARD_EVERY = 25
"""Steps between two reads of the on-device NaN/inf flag."""


class NonFiniteLoss(CplCertError):
    """The loss became NaN or infinite; the message names the epoch and step."""


@dataclass(frozen=True)
class EpochTotals:
    """What the epoch's training steps add up to, summed over every process."""

    train_loss: float
    train_accuracy: float
    seen: int
    seconds: float
    lr: float


@dataclass
class _Accumulators:
    """On-device running sums of one epoch (read only at guard points and at the end)."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    first_bad: torch.Tensor

    @classmethod
    def zeros(cls, device: torch.device) -> _Accumulators:
        return cls(
            torch.zeros((), dtype=torch.float64, device=device),
            torch.zeros((), dtype=torch.int64, device=device),
            torch.full((), -1, dtype=torch.int64, device=device),
        )


def _epoch_seed(run: Run, epoch: int) -> int:
    return run.opts.seed * 1_000_003 + epoch


def _train_step(run: Run, index: torch.Tensor, generator: torch.Generator, acc: _Accumulators) -> None:
    """One optimiser step on the images ``index``; adds to the epoch's sums without a host sync."""
    x = to_float_images(run.augment(run.images[index], generator))
    y = run.labels[index]
    with run.autocast():
        logits = run.step_model(x)
        loss = run.loss_fn(logits, y)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    detached = loss.detach()
    acc.loss_sum += detached.double() * y.shape[0]
    acc.correct += (logits.detach().argmax(dim=1) == y).sum()
    bad_now = (acc.first_bad < 0) & ~torch.isfinite(detached)
    acc.first_bad = torch.where(bad_now, torch.full_like(acc.first_bad, run.global_step), acc.first_bad)


def _check_guard(run: Run, acc: _Accumulators, epoch: int) -> None:
    """Stop every process with one sentence if any of them saw a NaN or infinite loss."""
    bad = acc.first_bad.clone()
    if run.info.enabled:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    if int(bad) < 0:
        return
    steps = run.layout.steps_per_epoch
    bad_step = int(bad)
    kept = f"the last good checkpoint {run.out} (epoch {run.last_saved}) was kept" if run.last_saved else "no checkpoint had been written yet"
    raise NonFiniteLoss(
        f"training diverged: the loss became NaN or infinite at epoch {epoch}, step "
        f"{bad_step - (epoch - 1) * steps + 1} of {steps} (global step {bad_step}); {kept}; try a lower --lr"
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_epoch(run: Run, epoch: int, on_event: OnEvent) -> EpochTotals:
    """Train one epoch on this process's shard; returns the totals over all processes."""
    layout, info, device = run.layout, run.info, run.device
    run.model.train()
    shuffle = torch.Generator(device=device).manual_seed(_epoch_seed(run, epoch))
    perm = torch.randperm(len(run.train_data), generator=shuffle, device=device)[: layout.used][info.rank :: info.world_size]
    aug_gen = torch.Generator(device=device).manual_seed(_epoch_seed(run, epoch) * 4099 + info.rank + 1)
    acc = _Accumulators.zeros(device)
    _sync(device)
    start = time.perf_counter()
    lr = 0.0
    for s in range(layout.steps_per_epoch):
        lr = triangular_lr(run.global_step, layout.total_steps, run.opts.lr)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        _train_step(run, perm[s * layout.rank_batch : (s + 1) * layout.rank_batch], aug_gen, acc)
        run.global_step += 1
        if (s + 1) % GUARD_EVERY == 0 or s + 1 == layout.steps_per_epoch:
            _check_guard(run, acc, epoch)
        on_event(StepDone(epoch, s + 1, layout.steps_per_epoch))
    _sync(device)
    seconds = time.perf_counter() - start
    totals = torch.stack([acc.loss_sum, acc.correct.double(), torch.tensor(float(layout.per_rank), dtype=torch.float64, device=device)])
    dist_utils.all_reduce_sum(totals, info)
    loss_sum, correct, seen = (float(v) for v in totals.cpu())
    return EpochTotals(loss_sum / seen, correct / seen, int(seen), seconds, lr)
