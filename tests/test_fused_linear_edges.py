"""Edge inputs of qlora_linear / lora_linear that real callers pass: strided views, empty batches, requires_grad
combinations, autocast. Each result is checked against the same call on plain inputs (or the fp64 oracle)."""
import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference
from lora_kernels.nf4 import read_quant_state
from lora_kernels.ops import fused_linear
from tests._util import max_err, quantized

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
        if backend == "triton":  # the same kernels read the same values in the same order: bit for bit
            assert torch.equal(got, want)
        else:  # PyTorch's matmul may take another route for a strided operand
            torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "base-only"])
@pytest.mark.parametrize("x_shape", [(0, K), (2, 0, K)], ids=["m0", "3d-zero-dim"])
def test_empty_batch(backend, layer, lora, x_shape):
    packed, state, _, a, b, bias, _ = layer
    x = torch.zeros(x_shape, dtype=torch.bfloat16, requires_grad=True)
    a_ = a.clone().requires_grad_() if lora else None
    b_ = b.clone().requires_grad_() if lora else None
    bias_ = bias.clone().requires_grad_()
    y = lk.qlora_linear(x, packed, state, a_, b_, 1.5, bias=bias_, dropout_p=0.1, training=True)
    assert y.shape == (*x_shape[:-1], N) and y.dtype == torch.bfloat16
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert not bias_.grad.any()
    if lora:
        assert not a_.grad.any() and not b_.grad.any()


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "base-only"])
def test_empty_batch_fake_matches_real(backend, lora):
    """The fake (meta) implementation and the real op agree on every output's shape at M = 0 too."""
    packed, state, _ = quantized(N, K)
    q = read_quant_state(packed, state)
    a, b = (torch.randn(R, K), torch.randn(N, R)) if lora else (None, None)
    args = (torch.zeros(0, K, dtype=torch.bfloat16), q.packed, q.meta_tensors(), [N, K, q.blocksize, q.blocksize2],
            a, b, None, 2.0, 0.0, torch.zeros((), dtype=torch.int64))
    torch.library.opcheck(fused_linear._linear_fwd, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("needs", ["x", "A", "B", "AB", "bias", "none"])
def test_requires_grad_combinations(backend, layer, needs):
    """Each input that requires grad gets the gradient it gets when all do; the others get none."""
    packed, state, _, a, b, bias, x = layer
    names = ("x", "A", "B", "bias")
    grads = {}
    for flags in (names, tuple(n for n in names if n in needs)):
        ins = {n: t.clone().requires_grad_(n in flags) for n, t in zip(names, (x, a, b, bias))}
        y = lk.qlora_linear(ins["x"], packed, state, ins["A"], ins["B"], 1.5, bias=ins["bias"])
        assert y.requires_grad == bool(flags)
        if flags:
            y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype))
        grads[flags == names] = {n: t.grad for n, t in ins.items()}
    for n in names:
        if n in needs:
            assert torch.equal(grads[False][n], grads[True][n]), n
        else:
            assert grads[False][n] is None, n


def test_double_backward_is_refused(layer):
    packed, state, _, a, b, _, x = layer
    xs = x.clone().requires_grad_()
    y = lk.qlora_linear(xs, packed, state, a.clone().requires_grad_(), b, 1.5)
    (gx,) = torch.autograd.grad(y.float().square().sum(), xs, create_graph=True)
    with pytest.raises(RuntimeError, match="linear_bwd|differentiate twice"):  # the op, or the eager Function
        gx.float().sum().backward()


@pytest.mark.parametrize("backward_inside", [False, True], ids=["backward-after", "backward-inside"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_autocast_leaves_the_op_in_x_dtype(backend, layer, backward_inside, x_dtype):
    """Under CPU autocast the op computes in x's dtype, as its fake implementation says and as without autocast.
    The reference backend used to let autocast recast its matmuls: y came back bf16 for an fp32 x and the
    backward then failed on mixed dtypes."""
    packed, state, w, a, b, bias, x = layer
    x = x.to(x_dtype)
    results = []
    for autocast in (True, False):
        xs, as_, bs = x.clone().requires_grad_(), a.clone().requires_grad_(), b.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = lk.qlora_linear(xs, packed, state, as_, bs, 1.5, bias=bias)
            if backward_inside:
                y.float().sum().backward()
        if not backward_inside:
            y.float().sum().backward()
        results.append((y, xs.grad, as_.grad, bs.grad))
    y = results[0][0]
    assert y.dtype == x_dtype and results[0][1].dtype == x_dtype
    for got, want in zip(*results):
        assert got.dtype == want.dtype and torch.equal(got, want)
    oracle = reference.lora_linear_ref(x.double(), w.double(), a.double(), b.double(), 1.5, bias.double())
    assert max_err(y, oracle) <= 2e-2 * oracle.abs().max().item()


def test_dense_weight_that_requires_grad_is_refused():
    """The op never gives W a gradient: a trainable W would silently stay untrained, so it is an error."""
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    w = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    a, b = torch.randn(4, 16), torch.randn(8, 4)
    with pytest.raises(ValueError, match="weight requires grad.*requires_grad_\\(False\\)"):
        lk.lora_linear(x, w, a, b, 1.0)
    with torch.no_grad():  # inference: no gradient is owed to anything
        y = lk.lora_linear(x, w, a, b, 1.0)
    assert torch.equal(y, lk.lora_linear(x, w.detach(), a, b, 1.0))


def test_int32_span_copies_only_views_that_reach_past_int32():
    span = fused_linear._int32_span
    small = torch.empty_strided((2, 8), (2**30, 1), device="meta")  # spans 2^30 + 8 elements
    assert span(small) is small
    huge = torch.empty_strided((4, 8), (2**30, 1), device="meta")  # a 4-row view into a >4 GiB buffer
    fixed = span(huge)
    assert fixed.shape == huge.shape and fixed.stride() == (8, 1)
    assert span(torch.empty_strided((0, 8), (2**40, 1), device="meta")).shape == (0, 8)
    with pytest.raises(ValueError, match="65536x32768 weight exceeds the Triton kernels' int32 indexing"):
        fused_linear._check_int32_extent(1, 2**16, 2**15)


def test_scaling_and_dropout_must_be_numbers(layer):
    packed, state, _, a, b, _, x = layer
    for bad in (None, "2.0", torch.ones(2)):
        with pytest.raises(TypeError, match="scaling must be a number"):
            lk.qlora_linear(x, packed, state, a, b, bad)
        with pytest.raises(TypeError, match="dropout_p must be a number"):
            lk.qlora_linear(x, packed, state, a, b, 1.0, dropout_p=bad, training=True)
    with pytest.raises(ValueError, match="scaling must be finite, got nan"):
        lk.qlora_linear(x, packed, state, a, b, float("nan"))
    y = lk.qlora_linear(x, packed, state, a, b, torch.tensor(2.0))
    assert torch.equal(y, lk.qlora_linear(x, packed, state, a, b, 2))


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["nodrop", "dropout"])
@pytest.mark.parametrize("bias_dtype", [torch.bfloat16, torch.float32], ids=["bias-bf16", "bias-fp32"])
@pytest.mark.parametrize("path", ["dequant", "fused"])
def test_paths_add_bias_and_lora_term(monkeypatch, path, bias_dtype, p):
    """The dequantize path adds bias and LoRA term with cuBLAS when it can (no dropout in the term, a bias in
    x's dtype) and through the epilogue kernel otherwise; forward and gradients against the fp64 oracle."""
    from lora_kernels.ops.common import INTERPRETED
    from tests._util import assert_close_to_oracle

    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    monkeypatch.setenv("LORA_KERNELS_PATH", path)
    packed, state, w = quantized(48, 128, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(20, 128, generator=gen).to(torch.bfloat16)
    a = torch.randn(8, 128, generator=gen) / 11
    b = torch.randn(48, 8, generator=gen) / 3
    bias = torch.randn(48, generator=gen).to(bias_dtype)
    leaves = [[t.clone().requires_grad_() for t in (x, a, b)] for _ in range(3)]
    torch.manual_seed(3)
    y = lk.qlora_linear(leaves[0][0], packed, state, leaves[0][1], leaves[0][2], 1.5, bias=bias, dropout_p=p,
                        training=True)
    torch.manual_seed(3)
    seed = int(torch.randint(2, 2**31 - 1, (), dtype=torch.int64)) if p > 0 else None
    x64, a64, b64 = leaves[1]
    y64 = reference.lora_linear_ref(x64.double(), w.double(), a64.double(), b64.double(), 1.5, bias.double(), p,
                                    seed)
    y_nat = reference.lora_linear_ref(leaves[2][0], w, leaves[2][1], leaves[2][2], 1.5, bias, p, seed)
    tol = dict(factor=2.0, atol=2.0**-7 if INTERPRETED else 1e-5)
    assert_close_to_oracle(y, y64, y_nat, **tol, what="y")
    dy = torch.randn(y.shape, generator=gen).to(torch.bfloat16)
    for t in (y, y64, y_nat):
        t.backward(dy.to(t.dtype))
    for name, i in (("dx", 0), ("dA", 1), ("dB", 2)):
        assert_close_to_oracle(leaves[0][i].grad, leaves[1][i].grad, leaves[2][i].grad, **tol, what=name)


def test_path_setting_is_read_and_checked_once_per_call(monkeypatch):
    from lora_kernels.ops import configs

    monkeypatch.setenv("LORA_KERNELS_PATH", " ")
    assert configs.path_setting() == "auto"
    assert configs.choose_path(1, "auto") == ("dequant" if configs.DEQUANT_PATH_MIN_M <= 1 else "fused")
    assert configs.choose_path(8192, "csrc") == "csrc"  # a forced path whatever M
    monkeypatch.setenv("LORA_KERNELS_PATH", "Fused")
    assert configs.path_setting() == configs.choose_path(8192) == "fused"
    monkeypatch.setenv("LORA_KERNELS_PATH", "gpu")
    with pytest.raises(ValueError, match="LORA_KERNELS_PATH='gpu' is not one of auto, fused, dequant, csrc"):
        configs.choose_path(16)
