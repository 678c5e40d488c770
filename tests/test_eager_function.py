"""The eager autograd.Function and the torch.library op run the same forward and backward: bit-identical outputs
and gradients (dropout, bias, 4-bit and dense, checkpoint recompute), and eager calls skip the op's dispatch."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

import lora_kernels as lk
from lora_kernels.ops import fused_linear
from tests._util import quantized


def _inputs(dense, bias, dtype=torch.bfloat16, n=48, k=64, r=8):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, k, generator=gen).to(dtype).requires_grad_()
    a = (torch.randn(r, k, generator=gen) / 8).requires_grad_()
    b = (torch.randn(n, r, generator=gen) / 3).requires_grad_()
    bb = (torch.randn(n, generator=gen).to(dtype)).requires_grad_() if bias else None
    if dense:
        w = (torch.randn(n, k, generator=gen) / 8).to(dtype)
        return lambda *t: lk.lora_linear(t[0], w, t[1], t[2], 0.5, bias=t[3], dropout_p=0.25, training=True), \
            (x, a, b, bb)
    packed, state, _ = quantized(n, k, dtype=dtype)
    return lambda *t: lk.qlora_linear(t[0], packed, state, t[1], t[2], 0.5, bias=t[3], dropout_p=0.25,
                                      training=True), (x, a, b, bb)


def _run(fn, tensors, eager, monkeypatch, recompute=False):
    monkeypatch.setattr(fused_linear, "EAGER_FUNCTION", eager)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    torch.manual_seed(11)
    y = checkpoint(fn, *leaves, use_reentrant=False) if recompute else fn(*leaves)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "checkpoint"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dense", [False, True], ids=["4bit", "dense"])
def test_eager_function_matches_the_op(monkeypatch, backend, dense, bias, recompute):
    fn, tensors = _inputs(dense, bias)
    got = _run(fn, tensors, True, monkeypatch, recompute)
    want = _run(fn, tensors, False, monkeypatch, recompute)
    assert len(got) == len(want) == (5 if bias else 4)
    for g, w in zip(got, want):
        assert g is not None and torch.equal(g, w)


def test_eager_calls_skip_the_op_dispatch(monkeypatch):
    calls = []
    real = fused_linear._linear_fwd

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(fused_linear, "_linear_fwd", spy)
    fn, (x, a, b, _) = _inputs(False, False)
    fn(x, a, b, None).sum().backward()
    assert calls == []
    monkeypatch.setattr(fused_linear, "EAGER_FUNCTION", False)
    fn(x, a, b, None)
    assert calls == [1]


def test_tensor_subclasses_go_through_the_op(monkeypatch):
    """A subclass (here a trivial one) may carry dispatch rules of its own: the op, not the Function, sees it."""
    class Sub(torch.Tensor):
        pass

    assert fused_linear._eager(torch.ones(2), None, torch.nn.Parameter(torch.ones(2)))
    assert not fused_linear._eager(torch.ones(2).as_subclass(Sub))
    monkeypatch.setattr(fused_linear, "EAGER_FUNCTION", False)
    assert not fused_linear._eager(torch.ones(2))


def test_saved_tensor_hooks_see_the_activation():
    """Activation offloading / checkpointing hooks must see x, as they do with the op."""
    fn, (x, a, b, _) = _inputs(False, False)
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x, a, b, None)
    assert tuple(x.shape) in [tuple(s) for s in packed]
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "no_leaf_needs_grad"])
def test_calls_without_gradients_skip_the_function(monkeypatch, backend, mode):
    """Nothing to differentiate (generation, evaluation): the forward runs without the autograd.Function, with the
    same bits as through it; a call that needs gradients still takes it."""
    applied = []
    real = fused_linear._LinearFunction.apply
    monkeypatch.setattr(fused_linear._LinearFunction, "apply", lambda *args: applied.append(1) or real(*args))
    fn, tensors = _inputs(False, True)
    x, a, b, bb = (t.detach() for t in tensors)
    torch.manual_seed(5)
    want = fn(x.requires_grad_(), a, b, bb)  # through the Function (x needs a gradient)
    assert applied == [1] and want.grad_fn is not None
    x = x.detach()
    torch.manual_seed(5)
    if mode == "no_grad":
        with torch.no_grad():
            got = fn(x.requires_grad_(), a.requires_grad_(), b, bb)
    elif mode == "inference_mode":
        with torch.inference_mode():
            got = fn(x, a, b, bb)
    else:
        got = fn(x, a, b, bb)
    assert applied == [1] and got.grad_fn is None and not got.requires_grad
    assert torch.equal(got, want.detach())
