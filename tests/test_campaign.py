"""A fast slice of the soundness campaign (``tests/campaign.py``, a small copy of benchmarks/soundness_campaign.py's
checks): one configuration of each kind, a few points each; no Jacobian above the bound, no adversarial example
inside a radius."""

from __future__ import annotations

import pytest
from campaign import configurations, run_config

CONFIGS = configurations()


@pytest.mark.parametrize("name, build", CONFIGS, ids=[name for name, _ in CONFIGS])
def test_campaign_slice(name, build):
    outcome = run_config(name, build, points=6, steps=60)
    assert outcome.lower <= outcome.upper
    assert outcome.violations == 0
    assert outcome.worst_exact >= 1 and outcome.worst_float32 >= 1 and outcome.worst_any >= 1
