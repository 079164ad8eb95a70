"""benchmarks/violation_campaign.py on a small dense model: resumable, every sense the certify result reports
is compared, and inflated certificates are reported as violations (exit code 3)."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import cpl_cert
from cpl_cert.certification import CertifyResult

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import violation_campaign  # noqa: E402

DATASET = {"name": "fashion-mnist", "input_shape": [1, 28, 28], "num_classes": 10}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = cpl_cert.build_model("cpl-tiny", input_shape=(1, 28, 28), num_classes=10, conv_depth=0, channels=1, dense_depth=2, dense_inner=64)
    path = tmp_path_factory.mktemp("campaign") / "dense.safetensors"
    cpl_cert.save_checkpoint(cpl_cert.freeze(model), path, dataset=DATASET, training={})
    return path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip() != "{"]


def test_campaign_appends_chunks_resumes_and_checks_every_sense(checkpoint: Path, tmp_path: Path, capsys):
    out = tmp_path / "c.jsonl"
    args = ["--models", str(checkpoint), "--points", "6", "--chunk", "3", "--apgd-points", "0", "--out", str(out), "--threads", "1"]
    assert violation_campaign.main(args) == 0
    first = rows(out)
    assert [(r["attack"], r["start"], r["stop"]) for r in first] == [("fmn", 0, 3), ("fmn", 3, 6)]
    ratios = {}
    for point in (p for r in first for p in r["points"]):
        assert set(point["senses"]) == {"exact", "float32", "any"}
        for sense, value in point["senses"].items():
            assert value["checked"] and not value["violation"]
            if value["radius"] > 0 and value["distance"] is not None:  # (radius 0: nothing to violate)
                assert value["distance"] >= value["radius"]
                ratios[sense] = min(ratios.get(sense, math.inf), value["distance"] / value["radius"])
    assert {"exact", "float32"} <= set(ratios)
    printed = capsys.readouterr().out
    assert f"exact {ratios['exact']:.6f}, float32 {ratios['float32']:.6f}" in printed and "0 violations" in printed
    with out.open("a") as handle:  # a run killed while writing leaves a torn line
        handle.write("{")
    assert violation_campaign.main(args) == 0
    assert rows(out) == first  # nothing attacked again
    assert "6 point attacks" in capsys.readouterr().out


def test_inflated_certificates_are_reported_as_violations(checkpoint: Path, tmp_path: Path, monkeypatch, capsys):
    """Certify results with radii 50x too large (a stand-in for a wrong bound): FMN's examples beat them, in both senses."""
    honest = cpl_cert.certify

    def inflated(*args, **kwargs):
        result = honest(*args, **kwargs)
        return dataclasses.replace(result, radii_exact=result.radii_exact * 50, radii_float32=result.radii_float32 * 50,
                                   radii_any=result.radii_any * 50)

    monkeypatch.setattr(cpl_cert, "certify", inflated)
    out = tmp_path / "v.jsonl"
    code = violation_campaign.main(["--models", str(checkpoint), "--points", "4", "--chunk", "4", "--apgd-points", "0", "--out", str(out)])
    assert code == 3
    printed = capsys.readouterr().out
    assert "VIOLATION" in printed and "(exact)" in printed and "(float32)" in printed


def test_senses_come_from_the_certify_result_fields():
    """A certify result with a third sense (a field radii_<sense>) is compared in it too; a sense the attack
    suite does not verify is reported as unchecked."""

    @dataclasses.dataclass
    class ThreeSenses(CertifyResult):
        radii_float16: torch.Tensor = dataclasses.field(default_factory=lambda: torch.tensor([0.5, 0.5]))

    cert = ThreeSenses(
        labels=torch.tensor([1, 2]), predictions=torch.tensor([1, 2]), predictions_float32=torch.tensor([1, 2]),
        predictions_any=torch.tensor([1, -1]), margins=torch.zeros(2), radii=torch.tensor([0.2, 0.2]),
        radii_exact=torch.tensor([0.3, 0.3]), radii_float32=torch.tensor([0.2, 0.2]), radii_any=torch.tensor([0.1, 0.0]), eps=[],
        bounds=None, device="cpu", seconds=0.0,  # type: ignore[arg-type]
    )

    class Suite:
        names = ["fmn"]
        distance = torch.tensor([[0.31, math.inf]], dtype=torch.float64)
        distance_float32 = torch.tensor([[0.19, 0.25]], dtype=torch.float64)

        def source_of(self, e: int, i: int, sense: str = "exact") -> str:
            return "fmn"

    assert set(violation_campaign.certificate_senses(cert)) == {"exact", "float32", "any", "float16"}
    records = violation_campaign.point_records(cert, Suite(), start=10)
    assert [r["index"] for r in records] == [10, 11]
    assert records[0]["senses"]["exact"]["violation"] is False and records[1]["senses"]["exact"]["distance"] is None
    assert records[0]["senses"]["float32"]["violation"] is True and records[1]["senses"]["float32"]["violation"] is False
    assert records[0]["senses"]["float16"] == {"radius": 0.5, "checked": False}
