"""Each epoch's evaluation: a frozen copy of the model (the live state is untouched), certified on the test split."""

from __future__ import annotations

import copy
import time

from ..certification import certify
from ..freezing import freeze
from ..models import CPLNet
from ..spectral import REPORT_ITERS
from .epoch import EpochTotals
from .events import EpochStats, Evaluating, OnEvent, ignore
from .setup import Run

EVAL_BATCH = 1024


def freeze_iterations(run: Run) -> int:
    """Lanczos steps ``freeze`` spends per layer on the report's sigma (``--freeze-iters``, else the library default).

    The step never depends on them: ``freeze`` takes it from the certified spectral-norm bound.
    """
    return run.opts.freeze_iters or REPORT_ITERS


def evaluate_epoch(run: Run, epoch: int, totals: EpochTotals, on_event: OnEvent = ignore) -> tuple[CPLNet, EpochStats]:
    """Freeze a copy, certify it on the test split at the dataset's radii; returns the copy and the epoch's stats.

    ``on_event`` hears each stage (``Evaluating``): the freeze, then certification's progress.
    """
    start = time.perf_counter()
    frozen = copy.deepcopy(run.model)
    iterations = freeze_iterations(run)
    on_event(Evaluating(epoch, "freeze", 0, iterations))
    freeze(frozen, max_iters=iterations)

    def on_progress(stage: str, done: float, total: float) -> None:
        on_event(Evaluating(epoch, stage, int(done), int(total)))

    cert = certify(
        frozen, run.test_data, eps=[e.label for e in run.eps], device=run.device, batch_size=EVAL_BATCH, on_progress=on_progress
    )
    stats = EpochStats(
        epoch=epoch, step=run.global_step, lr=totals.lr, train_loss=totals.train_loss, train_accuracy=totals.train_accuracy,
        clean_accuracy=cert.clean_accuracy, certified={e.label: cert.certified_accuracy(e.value) for e in run.eps},
        lipschitz_upper=cert.bounds.upper, epoch_seconds=totals.seconds,
        images_per_second=totals.seen / totals.seconds if totals.seconds > 0 else 0.0,
        eval_seconds=time.perf_counter() - start, eval_n=cert.n,
    )
    return frozen, stats
