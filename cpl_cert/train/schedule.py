"""The CPL paper's triangular learning-rate schedule, stepped once per iteration.

Over ``total`` optimiser steps ``0 .. total-1`` the rate goes linearly from 0 (first step) to the peak
at 40 % of the run, down to peak/20 at 80 %, and to 0 at the very last step. Unlike the reference
code, it starts at step 0 (not one epoch late) and reaches 0 only at the final step.
"""

from __future__ import annotations

import numpy as np

KNOTS = ((0.0, 0.0), (0.4, 1.0), (0.8, 0.05), (1.0, 0.0))


def triangular_factor(step: int, total: int) -> float:
    """The fraction of the peak rate to use at optimiser step ``step`` of ``total``."""
    if total <= 1:
        return 1.0
    progress = min(max(step / (total - 1), 0.0), 1.0)
    xs, ys = zip(*KNOTS, strict=True)
    return float(np.interp(progress, xs, ys))


def triangular_lr(step: int, total: int, peak: float) -> float:
    """The learning rate at optimiser step ``step`` of ``total`` for a peak rate ``peak``."""
    return peak * triangular_factor(step, total)
