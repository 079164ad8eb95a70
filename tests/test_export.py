"""``cpl-cert export --onnx``: ONNX Runtime gives cpl-cert's logits, and the metadata carry the certificate.

Tolerance: on the 10,000 shipped test images ONNX Runtime's logits differed from cpl-cert's by at most
9.5e-7 (truncation head, shipped model) and 1.9e-6 (a random LLN model); the tests allow 1e-5
(docs/deploy.md has the command). Tests that run ONNX need the optional onnx and onnxruntime packages.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_frozen
from typer.testing import CliRunner

import cpl_cert
from cpl_cert.cli import app
from cpl_cert.data.registry import FASHION_CLASSES
from cpl_cert.files import file_sha256
from cpl_cert.models import float64_copy

runner = CliRunner()
SHIPPED = Path(__file__).resolve().parents[1] / "models" / "fmnist-cpl-xs.safetensors"
ATOL = 1e-5
SKIP_REASON = "ONNX export needs the optional onnx and onnxruntime packages (pip install onnx onnxruntime)"


@pytest.fixture
def onnx_packages():
    pytest.importorskip("onnx", reason=SKIP_REASON)
    pytest.importorskip("onnxruntime", reason=SKIP_REASON)


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("CPL_CERT_OFFLINE", "1")
    monkeypatch.setenv("CPL_CERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CPL_CERT_DATA", raising=False)


def run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"images": x.float().numpy()})[0])


def metadata(path: Path) -> dict[str, str]:
    import onnx

    return {entry.key: entry.value for entry in onnx.load(str(path)).metadata_props}


def deployed_radii(logits: torch.Tensor, pair: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a deployment computes from the metadata alone: argmax and min_j (f_top - f_j) / L[top, j]."""
    logits = logits.double()
    top = logits.argmax(dim=1)
    gaps = logits.gather(1, top[:, None]) - logits
    ratios = gaps / pair[top]
    ratios[torch.arange(len(top)), top] = math.inf
    return top, ratios.min(dim=1).values


def test_shipped_model_runs_in_onnxruntime_with_its_certificate(onnx_packages, tmp_path):
    out = tmp_path / "model.onnx"
    result = runner.invoke(app, ["export", str(SHIPPED), "--onnx", str(out)])
    assert result.exit_code == 0, result.output
    assert "onnxruntime check: max |logit difference|" in result.stdout
    data = cpl_cert.load_dataset("fashion-mnist").subset(1000)
    x = data.images.float() / 255
    model, _ = cpl_cert.load_checkpoint(SHIPPED)
    with torch.no_grad():
        expected = model(x)
    logits = run_onnx(out, x)
    assert (logits - expected).abs().max() <= ATOL
    props = metadata(out)
    bounds = cpl_cert.lipschitz_bounds(model)
    pair = torch.tensor(json.loads(props["cpl_cert.pair_lipschitz"]), dtype=torch.float64)
    assert torch.equal(pair, bounds.pair_lipschitz())  # exact: JSON keeps every float64 digit
    assert float(props["cpl_cert.body_lipschitz"]) == bounds.body_upper == pytest.approx(1.0)
    assert json.loads(props["cpl_cert.classes"]) == list(FASHION_CLASSES)
    assert json.loads(props["cpl_cert.input_shape"]) == [1, 28, 28]
    assert json.loads(props["cpl_cert.normalization"]) == {"mean": list(model.config.mean), "std": [1.0], "in_graph": True}
    assert props["cpl_cert.checkpoint_sha256"] == file_sha256(SHIPPED) and props["cpl_cert.dataset"] == "fashion-mnist"
    assert props["cpl_cert.head"] == "truncation" and props["cpl_cert.format"] == "cpl-cert-onnx/1"
    # A deployment's radii from ONNX logits and the metadata: the exact function's radii (evaluated
    # here in float64), up to the logit tolerance; certify's rigorous lower bounds lie below them.
    with torch.no_grad():
        exact_logits = float64_copy(model)(data.images.double() / 255)
    top64, exact_radii = deployed_radii(exact_logits, pair)
    top, radii = deployed_radii(logits, pair)
    reference = cpl_cert.certify(model, data, eps=[0.25], device="cpu")
    clear = reference.margins > 4 * ATOL  # away from ties, where float32 may pick the other class
    assert torch.equal(top[clear], top64[clear]) and int(clear.sum()) > 990
    decided = reference.predictions >= 0  # -1: a near tie certify did not need to settle
    assert torch.equal(top[clear & decided], reference.predictions[clear & decided])
    assert (radii[clear] - exact_radii[clear]).abs().max() <= 2 * ATOL / math.sqrt(2)
    assert bool((reference.radii_exact <= exact_radii * (1 + 1e-9)).all())


def graph_rows(path: Path) -> list[list[Fraction]]:
    """The LLN head's rows as the exported graph stores them (the Gemm that writes the logits), as exact fractions."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    (gemm,) = [node for node in proto.graph.node if list(node.output) == ["logits"]]
    assert gemm.op_type == "Gemm" and {a.name: a.i for a in gemm.attribute}.get("transB") == 1
    (weight,) = [numpy_helper.to_array(init) for init in proto.graph.initializer if init.name == gemm.input[1]]
    assert weight.dtype == np.float32
    return [[Fraction(float(v)) for v in row] for row in weight]


def assert_pairs_bound_rows(pair: list[list[float]], body: float, rows: list[list[Fraction]]) -> None:
    """One-sided and exact: L[i][j] >= body * ||r_i - r_j|| in rational arithmetic (squares compared), and
    L[i][j] within 1e-9 relative of it (a bound, and a tight one)."""
    squared = [[sum((a - b) ** 2 for a, b in zip(row_i, row_j, strict=True)) for row_j in rows] for row_i in rows]
    for i, j in itertools.product(range(len(rows)), repeat=2):
        assert Fraction(pair[i][j]) ** 2 >= Fraction(body) ** 2 * squared[i][j], (i, j, pair[i][j], body * math.sqrt(squared[i][j]))
    for i, j in itertools.product(range(len(rows)), repeat=2):
        assert pair[i][j] <= body * math.sqrt(squared[i][j]) * (1 + 1e-9), (i, j)


def test_lln_head_exports_with_its_pair_bounds(onnx_packages, tmp_path):
    # Dividing by std 0.25 makes the body 4-Lipschitz, so the pair bounds must carry the body bound.
    model = make_frozen(
        "cpl-tiny", input_shape=(3, 32, 32), num_classes=10, head="lln", channels=4, conv_depth=2, dense_depth=1, conv_inner=4,
        dense_inner=32, mean=(0.5, 0.4, 0.3), std=(0.25, 0.5, 0.5),
    )
    checkpoint = tmp_path / "lln.safetensors"
    classes = [f"class {i}" for i in range(10)]
    cpl_cert.save_checkpoint(model, checkpoint, dataset={"name": "cifar10", "classes": classes})
    out = tmp_path / "lln.onnx"
    assert runner.invoke(app, ["export", str(checkpoint), "--onnx", str(out)]).exit_code == 0
    model, _ = cpl_cert.load_checkpoint(checkpoint)
    x = torch.rand((64, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (run_onnx(out, x) - model(x)).abs().max() <= ATOL
    props = metadata(out)
    # The body bound is 1 / 0.25 = 4; the pair bounds hold for the rows the graph holds (read back from it).
    assert float(props["cpl_cert.body_lipschitz"]) == pytest.approx(4.0, rel=1e-9)
    assert json.loads(props["cpl_cert.normalization"]) == {"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.5, 0.5], "in_graph": True}
    assert_pairs_bound_rows(json.loads(props["cpl_cert.pair_lipschitz"]), float(props["cpl_cert.body_lipschitz"]), graph_rows(out))
    assert json.loads(props["cpl_cert.classes"]) == classes and props["cpl_cert.head"] == "lln"


def test_pair_bounds_hold_for_the_float32_rows_in_the_graph(onnx_packages, tmp_path):
    """Row 2 is exactly 3 x row 1 (integers / 8, so 3x is exact in float32): normalised in float64 the two
    rows are equal to 1e-16, but the graph holds them normalised in float32, where they differ by
    5.7e-8. A pair constant taken from the float64 rows (5.75e-14) would certify radii a million times
    too large for the exported model."""
    model = make_frozen(
        "cpl-tiny", input_shape=(1, 8, 8), num_classes=4, head="lln", channels=4, conv_depth=1, dense_depth=1, conv_inner=4, dense_inner=8
    )
    row = torch.tensor([((2 * k) % 17 - 8) / 8 for k in range(16)])
    with torch.no_grad():
        model.head.weight[1] = row
        model.head.weight[2] = 3 * row
    checkpoint = tmp_path / "lln3.safetensors"
    cpl_cert.save_checkpoint(model, checkpoint, dataset={"name": "x"})
    out = tmp_path / "lln3.onnx"
    result = runner.invoke(app, ["export", str(checkpoint), "--onnx", str(out)])
    assert result.exit_code == 0, result.output
    rows = graph_rows(out)
    assert rows[1] != rows[2], "the construction needs rows that float32 normalisation leaves apart"
    props = metadata(out)
    body = float(props["cpl_cert.body_lipschitz"])
    assert body == 1.0
    assert_pairs_bound_rows(json.loads(props["cpl_cert.pair_lipschitz"]), body, rows)


def test_a_wrong_graph_is_caught_before_it_is_written(onnx_packages, tmp_path, monkeypatch):
    """Exported as is, the block-sum pool loses its divisor_override in ONNX (divides by 16, not 4):
    the runtime check must refuse such a file and leave nothing behind."""
    import copy

    from cpl_cert import export

    monkeypatch.setattr(export, "deployable", lambda model: copy.deepcopy(model).float().eval())
    out = tmp_path / "wrong.onnx"
    result = runner.invoke(app, ["export", str(SHIPPED), "--onnx", str(out)])
    assert result.exit_code == 1 and "differ from cpl-cert's" in result.stderr and "nothing was written" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".wrong.onnx*"))


def test_export_without_onnx_says_how_to_install(tmp_path, monkeypatch):
    from cpl_cert import export

    real = importlib.util.find_spec
    monkeypatch.setattr(export.importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    result = runner.invoke(app, ["export", str(SHIPPED), "--onnx", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1 and result.stderr.strip() == "Error: " + export.INSTALL_HINT


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--onnx", "{tmp}/no/m.onnx"], "does not exist"),
        (["--onnx", "{tmp}"], "is a folder"),
        (["--onnx", "{tmp}/m.onnx", "--opset", "7"], "--opset must be between 9 and "),
        (["--onnx", "{tmp}/m.onnx", "--opset", "24"], "--opset must be between 9 and "),
        (["--onnx", "{tmp}/m.onnx", "--opset", "99"], "--opset must be between 9 and "),
    ],
)
def test_bad_export_options(onnx_packages, tmp_path, args, phrase):
    """Refused before any work: one sentence on stderr, nothing on stdout (an unsupported opset printed the
    exporter's IR on stdout and a RuntimeError)."""
    result = runner.invoke(app, ["export", str(SHIPPED), *(a.format(tmp=tmp_path) for a in args)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and phrase in lines[0], result.output
    assert result.stdout == "" and not (tmp_path / "m.onnx").exists()


def test_every_opset_in_the_supported_range_is_accepted_by_the_check():
    from cpl_cert.export import check_opset, supported_opsets

    low, high = supported_opsets()
    assert low == 9 and high >= 17
    for opset in (low, 17, high):
        check_opset(opset)


def deflated_radii(logits: torch.Tensor, x: torch.Tensor, props: dict[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The deployed rule of ``cpl_cert.radius`` (docs/deploy.md), from the metadata and a runtime's own float32
    logits: ``min_j (m_j - 2 (A ||x|| + B)) / (L + A)``, 0 where that is not positive or the top is not strict."""
    pair = torch.tensor(json.loads(props["cpl_cert.pair_lipschitz"]), dtype=torch.float64)
    allowance = json.loads(props["cpl_cert.runtime_allowance"])
    slope, offset = (torch.tensor(allowance[k], dtype=torch.float64) for k in ("A", "B"))
    logits = logits.double()
    top = logits.argmax(dim=1)
    norm = x.double().flatten(1).norm(dim=1)[:, None]
    margins = logits.gather(1, top[:, None]) - logits
    radii = (margins - 2 * (slope[top] * norm + offset[top])) / (pair[top] + slope[top])
    radii[torch.arange(len(top)), top] = math.inf
    radius = radii.min(dim=1).values * (1 - 1e-9)
    strict = (margins > 0).sum(dim=1) == logits.shape[1] - 1
    assert bool(((norm[:, 0] + radius.clamp_min(0)) <= allowance["norm_limit"]).all())
    return top, torch.where(strict & (radius > 0), radius, torch.zeros_like(radius))


@pytest.mark.parametrize("name", ["fmnist-cpl-xs", "fmnist-cpl-best"])
def test_the_deployed_radius_never_exceeds_the_exact_one(onnx_packages, tmp_path, name):
    """On the shipped split under ONNX Runtime: the radius a deployment computes from the metadata lies below
    an upper bound of the exact function's radius at every point (a float64 evaluation with its rounding
    bound), and stays useful. The undeflated rule margin / L exceeds it at about half the points."""
    from cpl_cert.certification import certificate_constants
    from cpl_cert.radii import float64_pass

    path = SHIPPED.parent / f"{name}.safetensors"
    out = tmp_path / "model.onnx"
    assert runner.invoke(app, ["export", str(path), "--onnx", str(out)]).exit_code == 0
    data = cpl_cert.load_dataset("fashion-mnist").subset(2000)
    x = data.images.float() / 255
    top, radius = deflated_radii(run_onnx(out, x), x, metadata(out))
    model, _ = cpl_cert.load_checkpoint(path)
    _, constants = certificate_constants(model)
    with torch.inference_mode():
        exact = float64_pass(float64_copy(model), constants, data.images, data.labels)
    same = exact.finite & (exact.low > 0) & (exact.top == top)
    assert bool((radius[~same] == 0).all())
    assert bool((radius[same] <= exact.high[same]).all())
    certified = radius[same & (exact.top == data.labels)]
    assert float((certified > 0).double().mean()) > 0.9 and float(certified.median()) > 0.5 * float(exact.low[same].median())
