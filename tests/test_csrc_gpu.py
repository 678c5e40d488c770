"""The csrc decode kernel on a GPU: correctness against the reference at real shapes, CUDA-graph capture,
dispatch from the fused op. Skipped without CUDA, or when lora_kernels/_csrc*.so is not built.
Weights are random 4-bit data with a random 16-entry code table (no bitsandbytes: the GPU image has none)."""
from types import SimpleNamespace

import pytest
import torch

import lora_kernels as lk
from lora_kernels import csrc
from lora_kernels.nf4 import Quant4bit
from lora_kernels.reference import dequantize_4bit_ref
from tests._util import capture_cuda_graph, max_err

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_library():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    st = csrc.status()
    if not st["found"]:
        pytest.skip(f"csrc library not available: {st['reason']}")


def random_quant(n, k, *, blocksize=64, nested=True, seed=0, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    numel = n * k
    blocks = -(-numel // blocksize)
    code = torch.sort(torch.rand(16, generator=g) * 2 - 1).values
    code[0], code[-1] = -1.0, 1.0
    packed = torch.randint(0, 256, ((numel + 1) // 2,), generator=g, dtype=torch.uint8)
    extra = {}
    if nested:
        bs2 = 256
        absmax = torch.randint(0, 256, (blocks,), generator=g, dtype=torch.uint8)
        extra = dict(code2=torch.sort(torch.rand(256, generator=g) * 2 - 1).values.to(device),
                     absmax2=(torch.rand(-(-blocks // bs2), generator=g) * 0.05 + 0.01).to(device),
                     offset=torch.tensor(0.04).to(device), blocksize2=bs2)
    else:
        absmax = torch.rand(blocks, generator=g) * 0.1 + 0.01
    return Quant4bit(packed=packed.to(device), code=code.to(device), absmax=absmax.to(device), blocksize=blocksize,
                     shape=(n, k), dtype=torch.bfloat16, quant_type="random", **extra)


def run_case(n, k, m, *, dtype=torch.bfloat16, blocksize=64, nested=True, r=16, bias=True, force_generic=False,
             factor=4.0, decode=None, pipeline=None):
    q = random_quant(n, k, blocksize=blocksize, nested=nested, seed=n + k + m)
    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, k, generator=g, device="cuda").to(dtype)
    xa = (torch.randn(m, r, generator=g, device="cuda")).to(dtype) if r else None
    b = (torch.randn(n, r, generator=g, device="cuda") / r**0.5).to(dtype) if r else None
    bs = torch.randn(n, generator=g, device="cuda").to(dtype) if bias else None
    s = 0.5
    out = csrc.linear_decode_fwd(x, q, xa, b, bs, s, force_generic=force_generic, decode=decode, pipeline=pipeline)
    torch.cuda.synchronize()
    w = dequantize_4bit_ref(q, dtype)  # bit-exact bitsandbytes decode, in the dtype
    oracle = x.double() @ w.double().t()
    native = x @ w.t()
    if r:
        oracle += s * (xa.double() @ b.double().t())
        native = native + s * (xa @ b.t())
    if bias:
        oracle += bs.double()
        native = native + bs
    # The fast kernel's decoded weight is not bit-exact (codes rounded to the dtype before the scale,
    # and at blocksize 64 the scale too, as bitsandbytes' own gemv_4bit does): a wider bound than 2x.
    err, ref = max_err(out, oracle), max_err(native, oracle)
    assert err <= factor * ref + 1e-3 * oracle.abs().max().item(), f"error {err:.3e} vs PyTorch's {ref:.3e}"
    return out


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("n,k", [(8192, 8192), (4096, 14336), (14336, 4096), (1024, 4096)])
@pytest.mark.parametrize("nested", [True, False])
def test_real_shapes_bf16(n, k, m, nested):
    run_case(n, k, m, nested=nested)


@pytest.mark.parametrize("blocksize", [64, 128, 256, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [3, 9])
def test_blocksizes_and_dtypes(blocksize, dtype, m):
    run_case(4096, 4096, m, dtype=dtype, blocksize=blocksize)


@pytest.mark.parametrize("decode", ["shared", "registers", "exact"])
@pytest.mark.parametrize("row_tiles", ["1", "2"])
@pytest.mark.parametrize("m,blocksize", [(16, 64), (12, 128), (4, 64)])
def test_decodes_and_row_tiles(monkeypatch, decode, row_tiles, m, blocksize):
    monkeypatch.setenv("LORA_KERNELS_CSRC_DECODE", decode)
    monkeypatch.setenv("LORA_KERNELS_CSRC_ROW_TILES", row_tiles)
    run_case(8192, 4096 + 64 * (blocksize == 64), m, blocksize=blocksize, factor=2.0 if decode == "exact" else 4.0)


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("n,k", [(8192, 8192), (14336, 4096)])
@pytest.mark.parametrize("warps", ["1", "4", "16"])
def test_exact_decode_real_shapes_and_warps(monkeypatch, n, k, m, warps):
    """The exact decode within the package's 2x contract; fixed warps per CTA (the measurement knob)."""
    monkeypatch.setenv("LORA_KERNELS_CSRC_WARPS", warps)
    run_case(n, k, m, factor=2.0, decode="exact")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nested,blocksize", [(True, 64), (False, 128), (True, 256)])
@pytest.mark.parametrize("m,row_tiles,pipeline", [(16, "1", "ring"), (16, "2", "ring"), (8, "1", "ring"),
                                                  (16, "1", "async"), (16, "2", "async"), (8, "1", "async"),
                                                  (8, "2", "async"), (1, "1", "async")])
def test_exact_decode_gives_the_reference_weights(monkeypatch, dtype, nested, blocksize, m, row_tiles, pipeline):
    """One-hot rows of x pick single columns of W: y[i, n] = W[n, k_i] with no rounding on the way (one
    non-zero product, fp32 sums of zeros), so the exact decode must return the reference weights bit for bit."""
    monkeypatch.setenv("LORA_KERNELS_CSRC_ROW_TILES", row_tiles)
    monkeypatch.setenv("LORA_KERNELS_CSRC_PIPELINE", pipeline)
    n, k = 1024 + 48, 512 + 64
    q = random_quant(n, k, blocksize=blocksize, nested=nested, seed=blocksize + m)
    w = dequantize_4bit_ref(q, dtype)
    got = torch.empty_like(w)
    for k0 in range(0, k, m):
        cols = torch.arange(k0, min(k0 + m, k), device="cuda")
        x = torch.zeros(m, k, device="cuda", dtype=dtype)
        x[torch.arange(len(cols), device="cuda"), cols] = 1
        y = csrc.linear_decode_fwd(x, q, None, None, None, 1.0, decode="exact")
        got[:, cols] = y[: len(cols)].t()
    assert torch.equal(got, w), f"{(got != w).sum().item()} of {w.numel()} weights differ"


@pytest.mark.parametrize("n,k", [(100, 4096 + 64), (77, 320), (33, 47), (16, 200), (50, 4096 + 32)])
def test_odd_shapes(n, k):
    """K % 128 == 64 (the masked tail), N not a multiple of 16, and shapes the generic kernel takes."""
    run_case(n, k, 5, r=8)


@pytest.mark.parametrize("n,k", [(512, 1024), (77, 320)])
def test_generic_kernel(n, k):
    run_case(n, k, 7, force_generic=True, factor=2.0)


def test_no_lora_no_bias():
    run_case(2048, 2048, 4, r=0, bias=False)


@pytest.mark.parametrize("decode", ["exact", "shared", "registers"])
@pytest.mark.parametrize("n,k,m,nested,blocksize", [
    (8192, 8192, 1, True, 64), (8192, 8192, 16, True, 64), (14336, 4096, 1, False, 128), (4096, 14336, 16, False, 64),
    (1024, 4096, 9, True, 256), (100, 4096 + 64, 5, True, 64), (50, 320, 16, False, 64), (4096, 4096, 3, True, 4096),
    (256, 4096 + 64, 3, False, 128)])  # K % 128 == 64: the tail step, blocksize 64 and 128
def test_async_pipeline(monkeypatch, n, k, m, nested, blocksize, decode):
    """The cp.async pipeline against the reference with its own launch, and bit for bit against the register ring
    with the same launch (4 warps; 16- and 32-row CTAs at M > 8): the same scales, decode, MMAs and reduction."""
    x_args = dict(blocksize=blocksize, nested=nested, decode=decode, factor=2.0 if decode == "exact" else 4.0)
    run_case(n, k, m, pipeline="async", **x_args)
    q = random_quant(n, k, blocksize=blocksize, nested=nested)
    plan = csrc.launch_plan(torch.empty(m, k, device="cuda", dtype=torch.bfloat16), q, decode=decode, pipeline="async")
    assert plan["pipeline"] == "async" and plan["smem"] > 0, plan
    monkeypatch.setenv("LORA_KERNELS_CSRC_WARPS", "4")
    for row_tiles in ("1", "2") if m > 8 else ("1",):
        monkeypatch.setenv("LORA_KERNELS_CSRC_ROW_TILES", row_tiles)
        ring = run_case(n, k, m, pipeline="ring", **x_args)
        got = run_case(n, k, m, pipeline="async", **x_args)
        assert torch.equal(got, ring), f"{(got != ring).sum().item()} outputs differ from the ring ({row_tiles} row tiles)"


@pytest.mark.parametrize("r", [1, 15, 16, 64, 96])
@pytest.mark.parametrize("m", [1, 16])
def test_async_lora_operands(monkeypatch, r, m):
    """The async kernel's epilogue reads b and xa from shared memory for even r <= 64 (else from global memory,
    as the ring does): the same sums as the ring either way, bias included (same warps: the same split of K)."""
    monkeypatch.setenv("LORA_KERNELS_CSRC_WARPS", "8")
    ring = run_case(1000, 4096, m, r=r, pipeline="ring", decode="exact", factor=2.0)
    got = run_case(1000, 4096, m, r=r, pipeline="async", decode="exact", factor=2.0)
    assert torch.equal(got, ring), f"{(got != ring).sum().item()} outputs differ from the register ring"


@pytest.mark.parametrize("pipeline", ["ring", "async"])
def test_cuda_graph_capture(monkeypatch, pipeline):
    monkeypatch.setenv("LORA_KERNELS_CSRC_PIPELINE", pipeline)
    n, k, m = 4096, 4096, 8
    q = random_quant(n, k)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    xa = torch.randn(m, 16, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, 16, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    graph, _ = capture_cuda_graph(lambda: csrc.linear_decode_fwd(x, q, xa, b, None, 0.5, out=out))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    eager = csrc.linear_decode_fwd(x, q, xa, b, None, 0.5)
    assert torch.equal(out, eager)


def quant_state_of(q):
    """A stand-in for bitsandbytes' QuantState with the attributes lora_kernels reads (no bitsandbytes here)."""
    state2 = SimpleNamespace(code=q.code2, absmax=q.absmax2, blocksize=q.blocksize2) if q.nested else None
    return SimpleNamespace(quant_type="nf4", shape=torch.Size(q.shape), blocksize=q.blocksize, code=q.code,
                           absmax=q.absmax, nested=q.nested, state2=state2, offset=q.offset, dtype=torch.bfloat16)


def test_fused_op_dispatches_to_csrc(monkeypatch):
    calls = []
    real = csrc.linear_decode_fwd

    def spy(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(csrc, "linear_decode_fwd", spy)
    q = random_quant(1024, 2048)
    state = quant_state_of(q)
    x = torch.randn(4, 2048, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(8, 2048, device="cuda") / 45
    bb = torch.randn(1024, 8, device="cuda") / 3
    lk.qlora_linear(x, q.packed, state, a, bb, 2.0)
    assert calls == ([(4, 2048)] if csrc.AUTO_DISPATCH else [])  # auto dispatch is off until enabled
    monkeypatch.setenv("LORA_KERNELS_PATH", "fused")
    y_triton = lk.qlora_linear(x, q.packed, state, a, bb, 2.0)
    monkeypatch.setenv("LORA_KERNELS_PATH", "csrc")
    y = lk.qlora_linear(x, q.packed, state, a, bb, 2.0)
    assert calls[-1] == (4, 2048)
    assert max_err(y, y_triton) <= 0.02 * y_triton.abs().max().item()
    with pytest.raises(ValueError, match="LORA_KERNELS_PATH=csrc, but x has 17 rows"):
        lk.qlora_linear(torch.randn(17, 2048, device="cuda", dtype=torch.bfloat16), q.packed, state, a, bb, 2.0)
