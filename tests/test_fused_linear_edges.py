"""Edge inputs of qlora_linear / lora_linear that real callers pass: strided views, empty batches, requires_grad
combinations, autocast. Each result is checked against the same call on plain inputs (or the fp64 oracle)."""
import pytest
import torch

import lora_kernels as lk
from tests._util import quantized

N, K, R = 40, 70, 8


@pytest.fixture
def layer():
    packed, state, w = quantized(N, K)
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(R, K, generator=gen) / K**0.5
    b = torch.randn(N, R, generator=gen) / R**0.5
    bias = torch.randn(N, generator=gen).to(torch.bfloat16)
    x = torch.randn(5, K, generator=gen).to(torch.bfloat16)
    return packed, state, w, a, b, bias, x


@pytest.fixture(params=["fused", "dequant"])
def path(request, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_PATH", request.param)
    return request.param


def test_strided_bias_is_read_by_stride(backend, path, layer):
    """A bias that is a strided view (a slice of a bigger buffer) gives what its contiguous copy gives; the
    Triton epilogue used to read it as if contiguous."""
    packed, state, _, a, b, bias, x = layer
    strided = torch.stack([bias, -bias], 1).reshape(-1)[::2]
    assert not strided.is_contiguous() and torch.equal(strided, bias)
    got = lk.qlora_linear(x, packed, state, a, b, 1.5, bias=strided)
    assert torch.equal(got, lk.qlora_linear(x, packed, state, a, b, 1.5, bias=bias))
    w = torch.randn(N, K).to(torch.bfloat16) / K**0.5
    got = lk.lora_linear(x, w, a, b, 1.5, bias=strided)
    assert torch.equal(got, lk.lora_linear(x, w, a, b, 1.5, bias=bias))


@pytest.mark.parametrize("view", ["transposed", "expanded", "permuted-3d", "column-slice"])
def test_non_contiguous_x_and_adapters(backend, view, layer):
    """Strided x (and transposed views of A and B) give the contiguous result, gradients included."""
    packed, state, _, a, b, bias, _ = layer
    gen = torch.Generator().manual_seed(2)

    def rand(*shape):
        return torch.randn(shape, generator=gen).to(torch.bfloat16)

    x = {"transposed": lambda: rand(K, 6).t(), "expanded": lambda: rand(1, K).expand(6, K),
         "permuted-3d": lambda: rand(K, 2, 3).permute(1, 2, 0), "column-slice": lambda: rand(6, 2 * K)[:, 1::2]}[view]()
    assert not x.is_contiguous()
    results = []
    for x_, a_, b_ in ((x, a.t().contiguous().t(), b.t().contiguous().t()), (x.contiguous(), a, b)):
        xs, as_, bs = x_.detach().requires_grad_(), a_.detach().requires_grad_(), b_.detach().requires_grad_()
        y = lk.qlora_linear(xs, packed, state, as_, bs, 1.5, bias=bias)
        y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype))
        results.append((y, xs.grad, as_.grad, bs.grad))
    for got, want in zip(*results):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())