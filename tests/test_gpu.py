"""The same checks on CUDA at real shapes (Llama-3-8B projections; M from decode to 8192, across every autotune
M bucket and both sides of the fused/dequant switch). Skipped without a GPU."""
import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference
from tests._util import assert_close_to_oracle, capture_cuda_graph, quantized

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096), (4096, 14336)])
def test_dequantize_bit_exact_on_cuda(dtype, n, k):
    packed, state, expected = quantized(n, k, dtype=dtype, device="cuda")
    assert torch.equal(lk.dequantize_4bit(packed, state), expected)


def _check_op(monkeypatch, path, m, n, k, r, p=0.1, bias_dtype=torch.bfloat16):
    """Forward and all gradients of qlora_linear (dropout, bias) against an fp32 oracle, on one path."""
    monkeypatch.setenv("LORA_KERNELS_PATH", path)
    dtype, s = torch.bfloat16, 2.0
    packed, state, w = quantized(n, k, dtype=dtype, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    a = (torch.randn(r, k, generator=gen, device="cuda") / k**0.5).requires_grad_()
    b = (torch.randn(n, r, generator=gen, device="cuda") / r**0.5).requires_grad_()
    bias = torch.randn(n, generator=gen, device="cuda").to(bias_dtype)
    xs = [x.clone().requires_grad_() for _ in range(3)]
    a_s = [a.detach().clone().requires_grad_() for _ in range(3)]
    b_s = [b.detach().clone().requires_grad_() for _ in range(3)]
    torch.manual_seed(1)
    y = lk.qlora_linear(xs[0], packed, state, a_s[0], b_s[0], s, bias=bias, dropout_p=p, training=True)
    torch.manual_seed(1)
    seed = int(torch.randint(2, 2**31 - 1, (), dtype=torch.int64)) if p > 0 else None
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    y32 = reference.lora_linear_ref(xs[1], w, a_s[1], b_s[1], s, bias, p, seed, upcast=torch.float32)
    y_nat = reference.lora_linear_ref(xs[2], w, a_s[2], b_s[2], s, bias, p, seed)
    assert_close_to_oracle(y, y32, y_nat, what=f"y (M={m}, {path})")
    dy = torch.randn(y.shape, generator=gen, device="cuda").to(dtype)
    for t in (y, y32, y_nat):
        t.backward(dy.to(t.dtype))
    for name, i in (("dx", xs), ("dA", a_s), ("dB", b_s)):
        assert_close_to_oracle(i[0].grad, i[1].grad, i[2].grad, what=f"{name} (M={m}, {path})")


@pytest.mark.parametrize("path", ["fused", "dequant"])
@pytest.mark.parametrize("n,k,r", [(4096, 4096, 16), (4096, 4096, 64), (4096, 14336, 16), (14336, 4096, 64)])
def test_qlora_linear_real_shapes(monkeypatch, path, n, k, r):
    _check_op(monkeypatch, path, 8192, n, k, r)


@pytest.mark.parametrize("path", ["auto", "fused"])
@pytest.mark.parametrize("m", [1, 16, 17, 64, 512, 2047, 2048, 8192])
def test_qlora_linear_every_m_bucket(monkeypatch, path, m):
    """4096x4096 forward and backward at every M the autotuner buckets differently, on the path auto picks and
    on the fused kernels forced (triton 3.6 once failed to build every 4-bit tile of 64+ rows: 17 <= M < 2048)."""
    _check_op(monkeypatch, path, m, 4096, 4096, 16)


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["nodrop", "dropout"])
@pytest.mark.parametrize("bias_dtype", [torch.bfloat16, torch.float32], ids=["bias-bf16", "bias-fp32"])
def test_dequant_path_bias_and_lora_term(monkeypatch, p, bias_dtype):
    """The dequantize path's cuBLAS additions (no dropout, bias in x's dtype) and its epilogue kernel."""
    _check_op(monkeypatch, "dequant", 2048, 4096, 4096, 16, p=p, bias_dtype=bias_dtype)


def test_eager_function_matches_the_op_on_cuda(monkeypatch):
    """Eager calls (autograd.Function) and the torch.library op give the same bits, forward and backward."""
    from lora_kernels.ops import fused_linear

    packed, state, _ = quantized(4096, 4096, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(512, 4096, generator=gen, device="cuda").to(torch.bfloat16)
    a = torch.randn(16, 4096, generator=gen, device="cuda") / 64
    b = torch.randn(4096, 16, generator=gen, device="cuda") / 4
    dy = torch.randn(512, 4096, generator=gen, device="cuda").to(torch.bfloat16)
    got = []
    for eager in (True, False):
        monkeypatch.setattr(fused_linear, "EAGER_FUNCTION", eager)
        leaves = [t.clone().requires_grad_() for t in (x, a, b)]
        torch.manual_seed(3)
        y = lk.qlora_linear(leaves[0], packed, state, leaves[1], leaves[2], 2.0, dropout_p=0.1, training=True)
        y.backward(dy)
        got.append([y.detach()] + [t.grad for t in leaves])
    for e, o in zip(*got):
        assert torch.equal(e, o)


def test_decode_shapes_on_cuda():
    """M = 1 and 16 (decode) at 8192x8192 against the fp32 oracle."""
    packed, state, w = quantized(8192, 8192, device="cuda")
    a = torch.randn(16, 8192, device="cuda") / 90
    b = torch.randn(8192, 16, device="cuda") / 4
    for m in (1, 16):
        x = torch.randn(m, 8192, device="cuda").to(torch.bfloat16)
        y = lk.qlora_linear(x, packed, state, a, b, 2.0)
        y32 = reference.lora_linear_ref(x, w, a, b, 2.0, upcast=torch.float32)
        y_nat = reference.lora_linear_ref(x, w, a, b, 2.0)
        assert_close_to_oracle(y, y32, y_nat, what=f"M={m}")


@pytest.mark.parametrize("path", ["auto", "dequant", "fused"])
def test_decode_call_in_a_cuda_graph(monkeypatch, path):
    """Generation can capture a decode step in a CUDA graph (static caches, torch.compile mode="reduce-overhead")
    and so drop the op's host time: the whole call must be capturable, and a replay with new x must give what
    an eager call gives (auto takes the csrc kernel when it is built)."""
    monkeypatch.setenv("LORA_KERNELS_PATH", path)
    packed, state, _ = quantized(1024, 2048, device="cuda")
    a = torch.randn(16, 2048, device="cuda") / 45
    b = torch.randn(1024, 16, device="cuda") / 4
    bias = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4, 2048, device="cuda", dtype=torch.bfloat16)

    def call():
        return lk.qlora_linear(x, packed, state, a, b, 2.0, bias=bias)

    with torch.no_grad():
        graph, y = capture_cuda_graph(call, warmups=3)
        for _ in range(2):
            x.copy_(torch.randn_like(x))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(y, call())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_csrc_exact_decode_gives_bitsandbytes_weights(dtype, quant_type):
    """The csrc kernel's exact decode against bitsandbytes' own CUDA dequantize (the independent oracle): one-hot
    rows of x pick columns of W with no rounding on the way, so they must come back bit for bit."""
    from lora_kernels import csrc
    from lora_kernels.nf4 import read_quant_state

    if not csrc.available():
        pytest.skip(f"csrc library not available: {csrc.status()['reason']}")
    n, k, m = 512 + 16, 1024 + 64, 16
    packed, state, w = quantized(n, k, dtype=dtype, quant_type=quant_type, device="cuda")
    q = read_quant_state(packed, state)
    got = torch.empty_like(w)
    for k0 in range(0, k, m):
        x = torch.zeros(m, k, device="cuda", dtype=dtype)
        x[torch.arange(m, device="cuda"), torch.arange(k0, k0 + m, device="cuda")] = 1
        got[:, k0:k0 + m] = csrc.linear_decode_fwd(x, q, None, None, None, 1.0, decode="exact").t()
    assert torch.equal(got, w), f"{(got != w).sum().item()} of {w.numel()} weights differ"
