"""The shipped models load, and `cpl-cert certify` reproduces the numbers of models/README.md.

The expected figures are read from the README's summary table, so the test checks the README itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cpl_cert
from cpl_cert.cli import app

MODELS = Path(__file__).resolve().parents[1] / "models"
FIGURES = r"\s*\|\s*([\d.]+) %\s*\|\s*([\d.]+) %\s*\|\s*([\d.]+) %\s*\|\s*([\d.]+) %\s*\|\s*([\d.]+) %\s*\|"
ROW = re.compile(r"^\|\s*`([\w.-]+\.safetensors)`" + FIGURES)
FLOAT32_ROW = re.compile(r"^\|\s*`([\w.-]+\.safetensors)`, float32" + FIGURES)
ANY_ROW = re.compile(r"^\|\s*`([\w.-]+\.safetensors)`, any runtime" + FIGURES)


def readme_rows(pattern: re.Pattern[str] = ROW) -> dict[str, list[float]]:
    """``{file: [clean, eps 0.1, 0.25, 0.5, 1.0]}`` in percent, from a table of models/README.md."""
    rows = {}
    for line in (MODELS / "README.md").read_text().splitlines():
        match = pattern.match(line)
        if match:
            rows[match.group(1)] = [float(v) for v in match.groups()[1:]]
    return rows


def test_every_shipped_model_has_a_readme_row():
    shipped = sorted(p.name for p in MODELS.glob("*.safetensors"))
    assert shipped and shipped == sorted(readme_rows())


@pytest.mark.parametrize("name", sorted(readme_rows()))
def test_certify_reproduces_the_readme(name: str, tmp_path: Path):
    model, meta = cpl_cert.load_checkpoint(MODELS / name)
    assert meta["training"]["epochs_completed"] == meta["training"]["epochs"]
    assert (MODELS / name).stat().st_size < 20_000_000
    report = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["certify", str(MODELS / name), "--device", "cpu", "--json", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    # The body (everything before the head) is 1-Lipschitz; an LLN head's own norm enters the
    # certificates through its per-pair constants, not through the whole-map bound.
    assert data["n"] == 10_000 and data["lipschitz"]["body_upper"] <= 1.0 + 1e-9
    if model.config.head == "truncation":
        assert data["lipschitz"]["upper"] <= 1.0 + 1e-9
    measured = [data["clean_accuracy"]] + [entry["accuracy"] for entry in data["certified"]]
    assert [entry["eps"] for entry in data["certified"]] == [0.1, 0.25, 0.5, 1.0]
    assert [round(100 * v, 2) for v in measured] == readme_rows()[name]
    for suffix, pattern in (("_float32", FLOAT32_ROW), ("_any", ANY_ROW)):
        figures = [data[f"clean_accuracy{suffix}"]] + [entry[f"accuracy{suffix}"] for entry in data["certified"]]
        assert [round(100 * v, 2) for v in figures] == readme_rows(pattern)[name], suffix
