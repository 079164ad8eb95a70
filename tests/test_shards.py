"""cpl_cert.shards in one process, and merging per-batch attack results (what a run over many processes
gathers) against recording the same outcomes in one run. Runs over two processes: test_torchrun.py."""

from __future__ import annotations

import math

import pytest
import torch

from cpl_cert.attacks.common import AttackOutcome
from cpl_cert.attacks.ensemble import SENSES, SuiteResult, merge_batches
from cpl_cert.errors import CplCertError
from cpl_cert.shards import JobFailed, Shards, describe, join


def test_one_process_maps_every_item_in_order_and_reports_each():
    done: list[int] = []
    shards = Shards()
    assert not shards.enabled and shards.is_main and shards.world_size == 1
    assert shards.map(range(5), lambda x: x * x, on_done=done.append) == [0, 1, 4, 9, 16]
    assert done == [1, 2, 3, 4, 5]
    shards.agree("anything", "data")  # nothing to compare with


def test_join_without_torchrun_is_the_whole_run_on_the_given_device(monkeypatch: pytest.MonkeyPatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with join("cpu") as shards:
        assert shards.device == torch.device("cpu") and not shards.enabled
    with pytest.raises(ValueError, match="inside"), join("cpu"):
        raise ValueError("raised inside")  # one process: the error is simply raised


def test_errors_read_as_the_command_line_says_them():
    assert describe(CplCertError("bad input")) == "bad input"
    assert describe(RuntimeError("out of memory\nmore detail")) == "RuntimeError: out of memory"
    assert str(JobFailed(1, 4, "RuntimeError: boom")) == "process 1 of 4 failed: RuntimeError: boom"


def _outcome(name: str, distances: list[float]) -> AttackOutcome:
    distance = torch.tensor(distances, dtype=torch.float64)
    found = torch.isfinite(distance)
    return AttackOutcome(found, torch.zeros(len(distances), 1), distance, name, {"attack": name})


# Per batch, the attacks that ran at each radius, in order, and the verified distance per point (the
# same in every sense here). Batch 0 runs only "apgd-t" (say apgd-ce broke nothing to pass on);
# batch 1 runs "apgd-ce" then "apgd-t"; so the single run numbers apgd-t 0 and apgd-ce 1.
BATCHES = [
    (slice(0, 2), [[("apgd-t", [0.5, math.inf])], [("apgd-t", [0.4, 0.9])]], ["note b"]),
    (slice(2, 5), [[("apgd-ce", [0.3, math.inf, 0.2]), ("apgd-t", [0.1, math.inf, math.inf])], [("apgd-ce", [0.6, 0.7, 0.8])]], ["note a", "note b"]),
]


def test_merged_batches_equal_one_run_recording_the_same_outcomes():
    eps, n = [0.25, 0.5], 5
    single = SuiteResult.empty(eps, n, torch.device("cpu"))
    parts = []
    for part, per_radius, notes in BATCHES:
        local = SuiteResult.empty(eps, part.stop - part.start, torch.device("cpu"))
        for e, outcomes in enumerate(per_radius):
            for name, distances in outcomes:
                verified = {sense: torch.tensor(distances, dtype=torch.float64) for sense in SENSES}
                single.record(e, part, _outcome(name, distances), verified)
                local.record(e, slice(0, part.stop - part.start), _outcome(name, distances), verified)
        single.note(notes)
        local.note(notes)
        parts.append((local, torch.tensor([True] + [False] * (part.stop - part.start - 1))))
    merged = merge_batches(eps, n, [p for p, _, _ in BATCHES], parts)
    assert merged.names == single.names == ["apgd-t", "apgd-ce"] and merged.settings == single.settings
    for sense in SENSES:
        assert torch.equal(merged.distances[sense], single.distances[sense])
        assert torch.equal(merged.sources[sense], single.sources[sense])
    assert merged.extra == single.extra == {"engine_warnings": ["note b", "note a"]}
    assert merged.rejected == 2
    assert merged.source_of(0, 2) == "apgd-t" and merged.source_of(1, 2) == "apgd-ce" and merged.source_of(0, 1) == ""
