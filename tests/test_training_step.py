"""The training forward (bias inside the product, the step folded into W^T's weights, channels-last convolutions)
against the plain ``update(x, hidden(x), step)`` under autograd: same values and gradients to float32 rounding."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cpl_cert.layers import STEP_EPSILON, CPLConv2d, CPLLinear


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def _plain(layer, x):
    """The composite the training forward replaces, with autograd's generic backward."""
    sigma = layer._training_sigma()
    return layer.update(x, layer.hidden(x), 2.0 / (sigma**2 + STEP_EPSILON))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("make", [lambda: CPLConv2d(6, 5, (9, 8)), lambda: CPLConv2d(16, 16, (12, 12)), lambda: CPLLinear(30, 20)])
def test_training_forward_and_gradients_match_the_plain_composite(make, layout):
    torch.manual_seed(0)
    layer = make().train()
    reference = copy.deepcopy(layer)
    shape = (8, *layer.u.shape[1:])
    x = torch.randn(shape)
    if x.dim() == 4:
        x = x.contiguous(memory_format=layout)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = layer(x1), _plain(reference, x2)
    assert torch.equal(layer.u, reference.u)  # the same power-iteration step on the same vector
    assert _relative(out, expected) <= 1e-6
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    assert _relative(x1.grad, x2.grad) <= 1e-5
    assert _relative(layer.weight.grad, reference.weight.grad) <= 1e-5
    assert _relative(layer.bias.grad, reference.bias.grad) <= 1e-5


def test_the_step_gradient_flows_through_sigma():
    """The gradient reaches sigma through the step folded into W^T's weights: without it the weight gradient
    differs, and with it the weight gradient matches the plain composite's (so its sign and size are right)."""
    torch.manual_seed(1)
    layer = CPLLinear(12, 9).train()
    reference = copy.deepcopy(layer)
    x = torch.randn(5, 12)
    layer(x).pow(2).sum().backward()
    _plain(reference, x).pow(2).sum().backward()
    assert _relative(layer.weight.grad, reference.weight.grad) <= 1e-5
    detached = copy.deepcopy(reference)
    detached.weight.grad = None
    sigma = detached._sigma_estimate().detach()
    detached.update(x, detached.hidden(x), 2.0 / (sigma**2 + STEP_EPSILON)).pow(2).sum().backward()
    assert _relative(detached.weight.grad, layer.weight.grad) > 1e-3


def test_eval_mode_runs_the_certified_composite_unchanged():
    """Certification runs ``hidden`` and ``update``; eval-mode ``forward`` must compute exactly that."""
    torch.manual_seed(2)
    layer = CPLConv2d(4, 3, (7, 7)).eval()
    x = torch.randn(3, 4, 7, 7)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.update(x, layer.hidden(x), layer.current_step()))


def _float64_step(layer, u: torch.Tensor, x: torch.Tensor, grad: torch.Tensor):
    """The training step's function in float64, written out: ``x - 2 / (||W u||^2 + eps) W^T relu(W x + b)``
    with the gradient through sigma; returns the output and the gradients of x, W and b for ``grad``."""
    w, b = (t.detach().double().requires_grad_() for t in (layer.weight, layer.bias))
    x = x.double().requires_grad_()
    conv = isinstance(layer, CPLConv2d)
    apply_w = (lambda v: F.conv2d(v, w, padding=layer.padding)) if conv else (lambda v: v @ w.t())
    apply_wt = (lambda v: F.conv_transpose2d(v, w, padding=layer.padding)) if conv else (lambda v: v @ w)
    step = 2.0 / (apply_w(u.double()).flatten().norm() ** 2 + STEP_EPSILON)
    out = x - step * apply_wt(torch.relu(apply_w(x) + (b.view(1, -1, 1, 1) if conv else b)))
    out.backward(grad.double())
    return out, x.grad, w.grad, b.grad


@pytest.mark.parametrize("make", [lambda: CPLConv2d(4, 4, (6, 6)), lambda: CPLLinear(30, 20)], ids=["conv", "dense"])
def test_bf16_autocast_training_step_runs_and_keeps_dtypes(make):
    """Under bfloat16 autocast a training step runs in bfloat16 (its values and gradients are off a float64
    evaluation of the same function by bfloat16's rounding, 2^-8 = 3.9e-3, not float32's 1e-7: measured
    2e-3 to 6e-3), keeps every parameter, buffer, gradient and the output in float32, updates the
    power-iteration vector in place, and an optimiser step applies those gradients."""
    torch.manual_seed(3)
    layer = make().train()
    storage, before = layer.u.data_ptr(), layer.weight.detach().clone()
    x = torch.randn(2, *layer.u.shape[1:])
    x1 = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x1)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad)
    reference = _float64_step(layer, layer.u, x, grad)  # the vector after this step's power iteration, as the layer used it
    for got, expected in zip((out, x1.grad, layer.weight.grad, layer.bias.grad), reference, strict=True):
        assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
        assert 1e-4 < _relative(got, expected) <= 2e-2  # bfloat16 arithmetic, to bfloat16 accuracy
    assert layer.u.data_ptr() == storage and all(t.dtype == torch.float32 for t in (*layer.parameters(), *layer.buffers()))
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    assert torch.equal(layer.weight.detach(), torch.add(before, layer.weight.grad, alpha=-0.1)) and layer.weight.dtype == torch.float32


def test_training_gradients_are_as_accurate_as_the_plain_composite():
    """Against a float64 evaluation of the plain composite (same vectors, so the same sigma): the training
    path's parameter gradients are no less accurate than the float32 plain composite's."""
    import cpl_cert
    from cpl_cert.layers import _CPLBase

    torch.manual_seed(5)
    model = cpl_cert.build_model("cpl-tiny", input_shape=(1, 16, 16), num_classes=4).train()
    layers = [m for m in model.modules() if isinstance(m, _CPLBase)]
    with torch.no_grad():
        for layer in layers:
            for _ in range(200):  # converged vectors: 1-Lipschitz layers, as in training
                layer._training_sigma()
            layer._training_sigma = layer._sigma_estimate  # freeze the vectors for the comparison
    x, y = torch.rand(32, 1, 16, 16), torch.randint(0, 4, (32,))
    reference, exact = copy.deepcopy(model), copy.deepcopy(model).double()

    def plain_forward(layer, v):
        sigma = layer._apply_w(layer.u, layer.weight).flatten().norm()
        return layer.update(v, layer.hidden(v), 2.0 / (sigma**2 + STEP_EPSILON))

    torch.nn.functional.cross_entropy(model(x), y).backward()
    for net, inputs in ((reference, x), (exact, x.double())):
        original = _CPLBase.forward
        _CPLBase.forward = plain_forward
        try:
            torch.nn.functional.cross_entropy(net(inputs), y).backward()
        finally:
            _CPLBase.forward = original
    pairs = list(zip(model.parameters(), reference.parameters(), exact.parameters(), strict=True))
    now = max(_relative(a.grad, c.grad) for a, _, c in pairs)
    plain = max(_relative(b.grad, c.grad) for _, b, c in pairs)
    assert now <= 2 * plain + 1e-6
