"""The Cholesky-certified dense bound and the Lanczos estimates, against SVDs and closed forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from references import exact_norm

from cpl_cert import dense_norm
from cpl_cert.dense_norm import cholesky_certificate, dense_norm_bound, gram, gram_error
from cpl_cert.freezing import freeze_layer
from cpl_cert.lanczos import lanczos_top
from cpl_cert.layers import CPLConv2d, CPLLinear
from cpl_cert.spectral import dense_sigma_upper, layer_operators, sigma_power


def _svd_norm(weight: torch.Tensor) -> float:
    return float(torch.linalg.svdvals(weight.double())[0])


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    rows=st.integers(1, 80),
    cols=st.integers(1, 80),
    kind=st.sampled_from(["gauss", "orthogonal", "rank-one", "scaled"]),
)
def test_cholesky_route_is_certified_and_tight(seed, rows, cols, kind):
    """Every size through the Lanczos + Cholesky route: random, clustered (orthogonal: every singular value 1),
    rank-one and extreme-scale matrices."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    if kind == "orthogonal":
        q = torch.linalg.qr(torch.randn(max(rows, cols), max(rows, cols), generator=g, dtype=torch.float64))[0]
        weight = q[:rows, :cols]
    elif kind == "rank-one":
        weight = torch.randn(rows, 1, generator=g, dtype=torch.float64) @ torch.randn(1, cols, generator=g, dtype=torch.float64)
    elif kind == "scaled":
        weight = weight * 10.0 ** torch.randint(-30, 30, (), generator=g).item()
    weight = weight.float()
    exact = _svd_norm(weight)
    bound, _ = dense_norm_bound(weight, cholesky_min_size=1)
    assert bound >= exact
    assert bound <= exact * (1 + 1e-6)


def test_cholesky_route_is_within_1e_9_on_a_preset_sized_layer():
    """A cpl-sm-sized dense layer (1024 x 384; Gram 384 >= CHOLESKY_MIN_SIZE): the route the presets take."""
    torch.manual_seed(0)
    layer = CPLLinear(384, 1024)
    exact = _svd_norm(layer.weight.detach())
    bound = dense_sigma_upper(layer.weight)
    assert exact <= bound <= exact * (1 + 2e-9)


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("n", [256, 512])
def test_the_certificate_never_accepts_a_shift_below_the_top_eigenvalue(n):
    """``W = H diag(d)`` (``H`` a Hadamard matrix) has ``W^T W = n diag(d^2)``: ``lambda_max = n max d^2`` exactly,
    while the computed Gram matrix ``W W^T`` is dense and rounded. Shifts a hair below ``lambda_max`` (1e-16 to
    3e-11 relative) sometimes let the floating-point Cholesky of the indefinite ``tau I - G`` run to completion;
    the certified bound must still be above. Checked: with the error terms removed (bound = ``tau``), 19 of
    these 144 shifts give a bound below ``lambda_max``."""
    g = torch.Generator().manual_seed(0)
    for trial in range(8 if n == 256 else 4):
        scale = torch.rand(n, generator=g) + 0.5
        if trial % 2:
            scale[3] = 2.0  # a well separated top eigenvalue
        weight = _hadamard(n) * scale
        lam = n * float(scale.double().max()) ** 2
        matrix = gram(weight)
        diagonal = matrix.diagonal().clone()
        for k in range(12):
            tau = lam * (1.0 - 10.0 ** (-16 + 0.5 * k))
            bound = cholesky_certificate(-matrix, diagonal, tau, gram_error(weight))
            assert bound is None or bound >= lam


def test_a_wrong_estimate_costs_tightness_never_soundness(monkeypatch):
    """Lanczos estimates far too low (half the top eigenvalue): every shift fails, the eigenvalue route answers."""
    def low(matrix):
        return 0.5 * float(torch.linalg.eigvalsh(matrix)[-1]), torch.ones(matrix.shape[0], dtype=torch.float64)

    monkeypatch.setattr(dense_norm, "estimate_top", low)
    weight = torch.randn(300, 280, generator=torch.Generator().manual_seed(1))
    exact = _svd_norm(weight)
    assert exact <= dense_sigma_upper(weight) <= exact * (1 + 1e-9)


def test_the_bound_is_deterministic_and_ignores_the_stored_vector():
    """freeze and a later lipschitz_bounds must compute the same sigma_upper (a larger one could make a frozen
    layer's bound exceed 1), so nothing may depend on the layer's power-iteration vector."""
    torch.manual_seed(2)
    layer = CPLLinear(400, 300)
    first = dense_sigma_upper(layer.weight)
    layer.u.copy_(F.normalize(torch.randn_like(layer.u), dim=1))
    assert dense_sigma_upper(layer.weight) == first


def test_gram_is_the_symmetric_product():
    side = torch.randn(600, 50, generator=torch.Generator().manual_seed(3))
    exact = side.double() @ side.double().t()
    result = gram(side, block=128)
    assert torch.equal(result, result.t())
    assert torch.allclose(result, exact, rtol=0, atol=1e-12 * float(exact.abs().max()))


def test_lanczos_finds_the_top_eigenpair_of_a_known_spectrum():
    values = torch.linspace(0.0, 1.0, 200, dtype=torch.float64) ** 3
    basis = torch.linalg.qr(torch.randn(200, 200, generator=torch.Generator().manual_seed(4), dtype=torch.float64))[0]
    matrix = basis @ torch.diag(values) @ basis.t()
    theta, vector, residual = lanczos_top(lambda v: matrix @ v, torch.ones(200, dtype=torch.float64), 120, rtol=1e-10)
    assert abs(theta - 1.0) <= 1e-12
    assert abs(float(vector @ basis[:, -1])) >= 1 - 1e-10
    assert residual <= 1e-9


@pytest.mark.parametrize("make", [lambda: CPLLinear(300, 280), lambda: CPLLinear(20, 12), lambda: CPLConv2d(6, 4, (10, 9))])
def test_freeze_reports_a_vector_close_to_the_norm_and_steps_from_the_bound(make):
    """Large dense layers take their bound's singular vector, others a Lanczos refresh: sigma_power (a lower bound)
    ends within 1e-4 of the exact norm here, and the frozen step satisfies the invariant with the exact norm."""
    torch.manual_seed(5)
    layer = make()
    freeze_layer(layer, max_iters=200)
    exact = exact_norm(layer)
    assert exact * (1 - 1e-4) <= sigma_power(layer) <= exact * (1 + 1e-12)
    assert float(layer.step) * exact**2 <= 2.0


def test_refreshing_never_lowers_the_reported_sigma():
    """The Krylov space contains the stored vector, so a warm start cannot make the report worse."""
    torch.manual_seed(6)
    layer = CPLConv2d(5, 3, (12, 12))
    freeze_layer(layer, max_iters=200)
    converged = sigma_power(layer)
    freeze_layer(layer, max_iters=3)
    assert sigma_power(layer) >= converged * (1 - 1e-6)


def test_the_transposed_convolution_is_the_adjoint():
    """<W x, y> = <x, W^T y> in float64 for the flipped-kernel conv2d that stands for conv_transpose2d."""
    torch.manual_seed(7)
    layer = CPLConv2d(4, 3, (7, 6))
    apply_w, apply_wt = layer_operators(layer, torch.float64)
    x, y = torch.randn(2, 4, 7, 6, dtype=torch.float64), torch.randn(2, 3, 7, 6, dtype=torch.float64)
    assert torch.allclose((apply_w(x) * y).sum(), (x * apply_wt(y)).sum(), rtol=1e-12)
    assert torch.allclose(apply_wt(y), F.conv_transpose2d(y, layer.weight.detach().double(), padding=1), atol=1e-12)
