"""A fast slice of the soundness campaign (benchmarks/soundness_campaign.py): one configuration of each
kind, a few points each; no Jacobian above the bound, no adversarial example inside a radius."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import soundness_campaign  # noqa: E402

QUICK = soundness_campaign.configurations(quick=True)


@pytest.mark.parametrize("name, build", QUICK, ids=[name for name, _ in QUICK])
def test_campaign_slice(name, build):
    outcome = soundness_campaign.run_config(name, build, points=6, steps=60)
    assert outcome.lower <= outcome.upper
    assert outcome.violations == 0
    assert outcome.worst_exact >= 1 and outcome.worst_float32 >= 1 and outcome.worst_any >= 1
