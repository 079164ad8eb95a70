"""A fast slice of the soundness campaign (``tests/campaign.py``, which benchmarks/soundness_campaign.py runs at
scale): one configuration of each kind, a few points each; no Jacobian above the bound, no adversarial example
inside a radius."""

from __future__ import annotations

import pytest
from campaign import configurations, run_config

CONFIGS = configurations(quick=True)


@pytest.mark.parametrize("name, build", CONFIGS, ids=[name for name, _ in CONFIGS])
def test_campaign_slice(name, build):
    outcome = run_config(name, build, points=6, steps=60)
    assert outcome.lower <= outcome.upper
    assert outcome.violations == 0
    assert outcome.worst_exact >= 1 and outcome.worst_float32 >= 1 and outcome.worst_any >= 1


def test_power_iteration_jacobian_norm_matches_svd():
    """The paper sizes' Jacobian check (power iteration) reaches the exact SVD norm from below on a small network."""
    import torch
    from campaign import _frozen, _jacobian_norm

    from cpl_cert.models import float64_copy

    exact = float64_copy(_frozen("cpl-xs", (1, 12, 12), 3))
    x = torch.rand(1, 1, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    svd = _jacobian_norm(exact, x)
    power = _jacobian_norm(exact, x, svd_limit=0, iterations=100)
    assert svd * (1 - 1e-6) <= power <= svd * (1 + 1e-9)
