"""torch.library registration: the op's schema and fake implementations, and torch.compile without graph breaks."""
import pytest
import torch

import lora_kernels as lk
from lora_kernels.ops import fused_linear
from tests._util import quantized


def _inputs(nested=True):
    packed, state, _ = quantized(40, 70, nested=nested)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 70, generator=gen).to(torch.bfloat16)
    a = (torch.randn(8, 70, generator=gen) * 0.1).requires_grad_()
    b = (torch.randn(40, 8, generator=gen) * 0.1).requires_grad_()
    return packed, state, x, a, b


@pytest.mark.parametrize("nested", [False, True])
def test_opcheck(backend, nested):
    """Schema, fake (meta) implementation, autograd registration and dispatch agree with the real kernels."""
    packed, state, x, a, b = _inputs(nested)
    from lora_kernels.nf4 import read_quant_state

    q = read_quant_state(packed, state)
    args = (x.reshape(-1, 70).requires_grad_(), q.packed, q.meta_tensors(), [40, 70, q.blocksize, q.blocksize2],
            a, b, torch.randn(40).to(torch.bfloat16), 2.0, 0.0, torch.zeros((), dtype=torch.int64))
    torch.library.opcheck(fused_linear._linear_fwd, args, test_utils=("test_schema", "test_faketensor",
                                                                      "test_autograd_registration"))


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_torch_compile_fullgraph(backend, dropout_p):
    """A function calling qlora_linear compiles with fullgraph=True (no graph break), forward and backward,
    and gives what eager mode gives; with dropout too, as the seed comes from torch's generator in both."""
    packed, state, x, a, b = _inputs()

    def block(x_, a_, b_):
        h = lk.qlora_linear(x_, packed, state, a_, b_, 2.0, dropout_p=dropout_p, training=True)
        return torch.nn.functional.silu(h).float().square().mean()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (block, compiled):
        a_, b_ = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        torch.manual_seed(3)
        loss = fn(x, a_, b_)
        loss.backward()
        results.append((loss.detach(), a_.grad, b_.grad))
    for eager, comp in zip(*results):
        assert torch.equal(eager, comp)


def test_torch_compile_inductor(backend):
    """The default inductor backend compiles the op as an opaque call and matches eager."""
    packed, state, x, a, b = _inputs()

    def block(x_):
        return lk.qlora_linear(x_, packed, state, a.detach(), b.detach(), 2.0).float().relu().sum(-1)

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    assert torch.equal(compiled(x), block(x))
