"""qlora_linear / lora_linear against an fp64 oracle (bitsandbytes' own dequantization as W), bounded by
PyTorch's own error in the same dtype; gradients against fp64 autograd; both backends."""
import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference
from lora_kernels.ops.common import INTERPRETED
from lora_kernels.ops.fused_linear import _draw_seed
from tests._util import assert_close_to_oracle, quantized

# (x shape, N, K, r, dtype, quant_type, nested, bias, adapter dtype)
CASES = [
    ((1, 70), 40, 70, 4, torch.bfloat16, "nf4", True, True, torch.float32),  # M = 1 (decode)
    ((37, 130), 96, 130, 8, torch.float16, "nf4", False, False, torch.float32),  # M, K odd
    ((2, 7, 64), 48, 64, 16, torch.bfloat16, "fp4", True, False, torch.bfloat16),  # 3-D x
    ((3, 11, 200), 72, 200, 64, torch.bfloat16, "nf4", True, True, torch.float32),  # K % 64 != 0, r = 64
    ((17, 70), 40, 70, 16, torch.float16, "fp4", False, True, torch.float16),
    ((9, 65), 30, 65, 4, torch.float16, "nf4", True, False, torch.float32),  # K odd: rows not byte-aligned
    ((20, 256), 48, 256, 8, torch.bfloat16, "nf4", True, True, torch.float32),  # K % blocksize == 0
]
IDS = ["m1-bf16-nf4", "m37-fp16-nf4", "3d-bf16-fp4", "r64-bf16-nf4", "m17-fp16-fp4", "kodd-fp16-nf4",
       "kaligned-bf16-nf4"]


def _tol(dtype, backend):
    """(factor, atol relative to the largest magnitude). The interpreter truncates fp32 -> bf16 (DESIGN.md),
    in the decoded W and in the stored output, where CUDA rounds: allow one bf16 ulp more there."""
    if backend == "triton" and INTERPRETED and dtype == torch.bfloat16:
        return dict(factor=2.0, atol=2.0**-7)
    return dict(factor=2.0, atol=1e-5)


def _adapters(n, k, r, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    a = (torch.randn(r, k, generator=gen) / k**0.5).to(dtype)
    b = (torch.randn(n, r, generator=gen) / r**0.5).to(dtype)
    return a, b


def _run_and_compare(fn, x, w_dense, a, b, scaling, bias, p, backend, dtype):
    """Runs fn (the op under test) and the fp64 / native references with the same dropout seed; compares
    the output and the gradients of x, A, B."""
    xs = [x.clone().requires_grad_() for _ in range(3)]
    a_s = [a.clone().requires_grad_() for _ in range(3)]
    b_s = [b.clone().requires_grad_() for _ in range(3)]
    torch.manual_seed(7)
    y = fn(xs[0], a_s[0], b_s[0])
    torch.manual_seed(7)
    _, seed_t = _draw_seed(p, True, a)
    seed = int(seed_t) if p > 0 else None
    up = torch.float64
    y64 = reference.lora_linear_ref(xs[1].to(up), w_dense.to(up), a_s[1].to(up), b_s[1].to(up), scaling,
                                    None if bias is None else bias.to(up), p, seed)
    y_nat = reference.lora_linear_ref(xs[2], w_dense, a_s[2], b_s[2], scaling, bias, p, seed)
    assert y.shape == y64.shape and y.dtype == x.dtype
    tol = _tol(dtype, backend)
    assert_close_to_oracle(y, y64, y_nat, **tol, what="y")
    gen = torch.Generator().manual_seed(3)
    dy = torch.randn(y.shape, generator=gen).to(dtype)
    y.backward(dy)
    y64.backward(dy.to(up))
    y_nat.backward(dy)
    for name, got, orc, nat in (("dx", xs[0].grad, xs[1].grad, xs[2].grad),
                                ("dA", a_s[0].grad, a_s[1].grad, a_s[2].grad),
                                ("dB", b_s[0].grad, b_s[1].grad, b_s[2].grad)):
        assert got is not None and got.shape == orc.shape, name
        assert got.dtype == (x.dtype if name == "dx" else a.dtype), name
        assert_close_to_oracle(got, orc, nat, **tol, what=name)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["nodrop", "drop"])
def test_qlora_linear_matches_oracle(backend, case, p):
    x_shape, n, k, r, dtype, qt, nested, has_bias, adt = case
    packed, state, w = quantized(n, k, dtype=dtype, quant_type=qt, nested=nested)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(x_shape, generator=gen).to(dtype)
    a, b = _adapters(n, k, r, adt)
    bias = torch.randn(n, generator=gen).to(dtype) if has_bias else None
    fn = lambda x_, a_, b_: lk.qlora_linear(x_, packed, state, a_, b_, 1.5, bias=bias, dropout_p=p, training=True)
    _run_and_compare(fn, x, w, a, b, 1.5, bias, p, backend, dtype)


@pytest.mark.parametrize("case", [CASES[1], CASES[5]], ids=[IDS[1], IDS[5]])
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["nodrop", "drop"])
def test_dequant_path_matches_oracle(monkeypatch, case, p):
    """The large-M path (decode to a buffer, dense GEMM, LoRA epilogue kernel), forced at small shapes."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    monkeypatch.setenv("LORA_KERNELS_PATH", "dequant")
    test_qlora_linear_matches_oracle("triton", case, p)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["nodrop", "drop"])
def test_lora_linear_dense_matches_oracle(backend, dtype, p):
    n, k, r = 56, 90, 8
    gen = torch.Generator().manual_seed(4)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    x = torch.randn(3, 13, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    a, b = _adapters(n, k, r, torch.float32)
    fn = lambda x_, a_, b_: lk.lora_linear(x_, w, a_, b_, 0.5, bias=bias, dropout_p=p, training=True)
    _run_and_compare(fn, x, w, a, b, 0.5, bias, p, backend, dtype)


def test_base_only_and_eval_mode(backend):
    """lora_A/lora_B None gives the base layer alone; training=False disables dropout."""
    packed, state, w = quantized(24, 40)
    x = torch.randn(5, 40, dtype=torch.bfloat16)
    y0 = lk.qlora_linear(x, packed, state, None, None, 2.0)
    y64 = x.double() @ w.double().t()
    assert_close_to_oracle(y0, y64, (x @ w.t()), **_tol(torch.bfloat16, backend), what="base")
    a, b = _adapters(24, 40, 4, torch.float32)
    ev1 = lk.qlora_linear(x, packed, state, a, b, 2.0, dropout_p=0.5, training=False)
    ev2 = lk.qlora_linear(x, packed, state, a, b, 2.0, dropout_p=0.0, training=True)
    assert torch.equal(ev1, ev2)


def test_dropout_mask_identical_in_forward_and_backward(backend):
    """With W = 0 and A = B = I, y = drop(x) shows the forward mask and dx = drop'(dy) the backward one."""
    k, m, p = 32, 20, 0.5
    eye = torch.eye(k, dtype=torch.float16)
    x = (torch.rand(m, k) + 0.5).to(torch.float16).requires_grad_()
    torch.manual_seed(11)
    y = lk.lora_linear(x, torch.zeros(k, k, dtype=torch.float16), eye, eye, 1.0, dropout_p=p, training=True)
    y.backward(torch.ones_like(y))
    keep_fwd, keep_bwd = y.detach() != 0, x.grad != 0
    torch.manual_seed(11)
    seed = int(_draw_seed(p, True, eye)[1])
    expected = reference.dropout_keep_mask(seed, m, k, p)
    assert torch.equal(keep_fwd, expected) and torch.equal(keep_bwd, expected)
    assert 0.3 < expected.float().mean().item() < 0.7
    torch.testing.assert_close(y.detach()[keep_fwd], (x.detach() / (1 - p))[keep_fwd], rtol=1e-3, atol=0)


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_reproduces_dropout(backend, reentrant):
    packed, state, _ = quantized(32, 48)
    a, b = _adapters(32, 48, 8, torch.float32)
    x = torch.randn(2, 6, 48).to(torch.bfloat16)

    def layer(x_, a_, b_):
        h = lk.qlora_linear(x_, packed, state, a_, b_, 2.0, dropout_p=0.3, training=True)
        return torch.nn.functional.gelu(h.float()).sum()

    grads = []
    for use_ckpt in (False, True):
        xs, a_s, b_s = x.clone().requires_grad_(), a.clone().requires_grad_(), b.clone().requires_grad_()
        torch.manual_seed(5)
        if use_ckpt:
            loss = torch.utils.checkpoint.checkpoint(layer, xs, a_s, b_s, use_reentrant=reentrant)
        else:
            loss = layer(xs, a_s, b_s)
        loss.backward()
        grads.append((xs.grad, a_s.grad, b_s.grad))
    for g0, g1 in zip(*grads):
        assert torch.equal(g0, g1)


def test_seeds_differ_between_calls():
    x = torch.ones(8, 64, dtype=torch.float16)
    eye = torch.eye(64, dtype=torch.float16)
    zero = torch.zeros(64, 64, dtype=torch.float16)
    y1 = lk.lora_linear(x, zero, eye, eye, 1.0, dropout_p=0.5, training=True)
    y2 = lk.lora_linear(x, zero, eye, eye, 1.0, dropout_p=0.5, training=True)
    assert not torch.equal(y1 != 0, y2 != 0)


def test_matches_peft_linear4bit_layer(backend, tmp_path):
    """PEFT's own Linear4bit (bitsandbytes matmul + PEFT LoRA) as an independent oracle."""
    from peft import LoraConfig, get_peft_model

    from lora_kernels import demo

    path = demo.save_tiny_llama(tmp_path / "m", demo.llama_config(hidden_size=64, num_layers=1, intermediate_size=96))
    model = demo.load_4bit(path)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["up_proj"], lora_dropout=0.0,
                                             init_lora_weights=False))
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    base = layer.base_layer
    x = torch.randn(2, 9, 64).to(torch.bfloat16)
    # x requiring grad keeps bitsandbytes from repacking the weight for AVX512-BF16 CPUs in an eval forward.
    peft_y = layer(x.clone().requires_grad_()).detach()
    with torch.no_grad():
        ours = lk.qlora_linear(x, base.weight, base.weight.quant_state, layer.lora_A["default"].weight,
                               layer.lora_B["default"].weight, layer.scaling["default"], bias=base.bias)
        w = lk.dequantize_4bit(base.weight, base.weight.quant_state).double()
        oracle = reference.lora_linear_ref(x.double(), w, layer.lora_A["default"].weight.double(),
                                           layer.lora_B["default"].weight.double(), layer.scaling["default"])
    assert peft_y.dtype == ours.dtype == torch.bfloat16
    assert_close_to_oracle(ours, oracle, peft_y, **_tol(torch.bfloat16, backend), what="vs PEFT")


# ------------------------------------------------------------------------------------- bad input

@pytest.fixture
def q4():
    packed, state, _ = quantized(24, 40)
    a, b = _adapters(24, 40, 4, torch.float32)
    return packed, state, a, b


def test_bad_shapes(q4):
    packed, state, a, b = q4
    x = torch.randn(3, 40, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"x has shape \(3, 41\) but the 4-bit weight has in_features 40"):
        lk.qlora_linear(torch.randn(3, 41, dtype=torch.bfloat16), packed, state, a, b, 1.0)
    with pytest.raises(ValueError, match=r"lora_A has shape \(4, 39\), expected \(r, 40\)"):
        lk.qlora_linear(x, packed, state, a[:, :39], b, 1.0)
    with pytest.raises(ValueError, match=r"lora_B has shape \(24, 3\), expected \(24, 4\)"):
        lk.qlora_linear(x, packed, state, a, b[:, :3], 1.0)
    with pytest.raises(ValueError, match="both be tensors or both be None"):
        lk.qlora_linear(x, packed, state, a, None, 1.0)
    with pytest.raises(ValueError, match=r"bias has shape \(23,\), expected \(24,\)"):
        lk.qlora_linear(x, packed, state, a, b, 1.0, bias=torch.zeros(23, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="dropout_p must be in"):
        lk.qlora_linear(x, packed, state, a, b, 1.0, dropout_p=1.0)


def test_bad_dtypes(q4):
    packed, state, a, b = q4
    x = torch.randn(3, 40, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        lk.qlora_linear(x.double(), packed, state, a, b, 1.0)
    with pytest.raises(TypeError, match="lora_A has dtype torch.int32"):
        lk.qlora_linear(x, packed, state, a.int(), b, 1.0)
    with pytest.raises(TypeError, match="weight has dtype torch.float16 but x has torch.bfloat16"):
        lk.lora_linear(x, torch.zeros(24, 40, dtype=torch.float16), a, b, 1.0)


def test_bad_quant_state_and_devices(q4):
    packed, state, a, b = q4
    x = torch.randn(3, 40, dtype=torch.bfloat16)
    state.quant_type = "nf3"
    with pytest.raises(ValueError, match="unknown 4-bit quant_type 'nf3'"):
        lk.qlora_linear(x, packed, state, a, b, 1.0)
    state.quant_type = "nf4"
    state.packing_format_for_cpu = True
    with pytest.raises(ValueError, match="CPU-repacked"):
        lk.qlora_linear(x, packed, state, a, b, 1.0)
    state.packing_format_for_cpu = False
    with pytest.raises(ValueError, match="different devices: weight on cpu, lora_A on meta"):
        lk.qlora_linear(x, packed, state, a.to("meta"), b, 1.0)


def test_backend_setting_errors(monkeypatch, q4):
    packed, state, a, b = q4
    x = torch.randn(3, 40, dtype=torch.bfloat16)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="LORA_KERNELS_BACKEND='cuda' is not one of"):
        lk.qlora_linear(x, packed, state, a, b, 1.0)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors, or TRITON_INTERPRET=1"):
        lk.qlora_linear(x, packed, state, a, b, 1.0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("LORA_KERNELS_PATH", "fastest")
    with pytest.raises(ValueError, match="LORA_KERNELS_PATH='fastest'"):
        lk.qlora_linear(x, packed, state, a, b, 1.0)


def test_int32_extent_is_refused_not_wrapped(monkeypatch):
    from lora_kernels.ops.fused_linear import _check_int32_extent

    _check_int32_extent(8192, 4096, 14336)  # real shapes pass
    with pytest.raises(ValueError, match="exceeds the Triton kernels' int32 indexing"):
        _check_int32_extent(2**18, 4096, 14336)
