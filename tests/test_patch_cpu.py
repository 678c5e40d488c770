"""The CPU production path (LORA_KERNELS_BACKEND=auto on CPU tensors): bitsandbytes' native decode where it gives
dequantize_4bit_ref's bits, and a dropout mask from torch's generator seeded with the op's seed that forward,
backward and checkpoint recomputation all reproduce. Philox stays the mask under =reference (the kernels' oracle)."""
import dataclasses

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import lora_kernels as lk
from lora_kernels import reference
from lora_kernels.nf4 import read_quant_state
from lora_kernels.ops.fused_linear import _draw_seed
from tests._util import quantized


@pytest.fixture(autouse=True)
def _auto(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "auto")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("n,k,bs", [(40, 70, 64), (48, 160, 64), (33, 96, 64), (16, 256, 32), (8, 1024, 1024),
                                    (24, 200, 128), (9, 65, 64), (4, 4096, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cpu_decode_is_the_reference_bit_for_bit(quant_type, nested, n, k, bs, dtype):
    """K = 160 and 96 are the shapes where bitsandbytes' 2-D CPU decode is wrong; 9x65 has an odd element count
    and blocksize 4096 takes bitsandbytes' other path: both stay on ours."""
    packed, state, _ = quantized(n, k, dtype=dtype, quant_type=quant_type, nested=nested, blocksize=bs)
    q = read_quant_state(packed, state)
    got = reference.dequantize_4bit_cpu(q, dtype)
    assert got.dtype == dtype and torch.equal(got, reference.dequantize_4bit_ref(q, dtype))
    native = (n * k) % 2 == 0 and bs < 2048
    assert reference._bnb_quant_type(q) == (quant_type if native else None)


def test_cpu_decode_other_table_and_storage():
    packed, state, _ = quantized(32, 96, quant_storage=torch.bfloat16)
    q = read_quant_state(packed, state)
    assert reference._bnb_quant_type(q) == "nf4"
    assert torch.equal(reference.dequantize_4bit_cpu(q, torch.bfloat16),
                       reference.dequantize_4bit_ref(q, torch.bfloat16))
    # a table bitsandbytes' kernels do not hard-code: ours decodes it
    other = dataclasses.replace(q, code=q.code.flip(0).contiguous())
    assert reference._bnb_quant_type(other) is None
    assert torch.equal(reference.dequantize_4bit_cpu(other, torch.bfloat16),
                       reference.dequantize_4bit_ref(other, torch.bfloat16))


def _identity_case(m=24, k=32):
    eye = torch.eye(k, dtype=torch.float32)
    x = (torch.rand(m, k) + 0.5).requires_grad_()
    return x, torch.zeros(k, k), eye, eye


def test_auto_mask_is_torch_generator_and_same_in_forward_and_backward():
    """W = 0, A = B = I: y = drop(x) shows the forward mask, dx = drop'(dy) the backward one."""
    p = 0.4
    x, w, a, b = _identity_case()
    torch.manual_seed(5)
    y = lk.lora_linear(x, w, a, b, 1.0, dropout_p=p, training=True)
    y.backward(torch.ones_like(y))
    torch.manual_seed(5)
    seed = int(_draw_seed(p, True, a)[1])
    want = reference.torch_keep_mask(seed, *x.shape, p)
    assert torch.equal(y.detach() != 0, want) and torch.equal(x.grad != 0, want)
    assert not torch.equal(want, reference.dropout_keep_mask(seed, *x.shape, p))  # not Philox's mask
    torch.testing.assert_close(y.detach()[want], (x.detach() / (1 - p))[want], rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad[want], torch.full_like(x.grad[want], 1 / (1 - p)), rtol=1e-6, atol=0)
    assert 0.5 < want.float().mean().item() < 0.7


def test_reference_backend_keeps_philox(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "reference")
    p = 0.4
    x, w, a, b = _identity_case()
    torch.manual_seed(5)
    y = lk.lora_linear(x, w, a, b, 1.0, dropout_p=p, training=True)
    torch.manual_seed(5)
    seed = int(_draw_seed(p, True, a)[1])
    assert torch.equal(y.detach() != 0, reference.dropout_keep_mask(seed, *x.shape, p))


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpoint_recompute_sees_the_same_mask(reentrant):
    packed, state, _ = quantized(48, 96)
    gen = torch.Generator().manual_seed(2)
    a = (torch.randn(8, 96, generator=gen) / 10).requires_grad_()
    b = (torch.randn(48, 8, generator=gen) / 10).requires_grad_()
    x = torch.randn(2, 10, 96, generator=gen).bfloat16().requires_grad_()

    def f(x_):
        return lk.qlora_linear(x_, packed, state, a, b, 2.0, dropout_p=0.3, training=True).float().square().sum()

    def grads(ckpt, seed=3):
        for t in (x, a, b):
            t.grad = None
        torch.manual_seed(seed)
        (checkpoint(f, x, use_reentrant=reentrant) if ckpt else f(x)).backward()
        return [t.grad.clone() for t in (x, a, b)]

    plain, ck = grads(False), grads(True)
    for g_plain, g_ck in zip(plain, ck):
        assert torch.equal(g_plain, g_ck)
    assert not torch.equal(grads(False, seed=4)[1], plain[1])  # another seed, other gradients: the mask acted


def test_one_mask_per_call(monkeypatch):
    calls = []
    real = reference.torch_keep_mask
    monkeypatch.setattr(reference, "torch_keep_mask", lambda *args, **kw: calls.append(args) or real(*args, **kw))
    packed, state, _ = quantized(48, 96)
    a = torch.randn(8, 96).requires_grad_()
    b = torch.randn(48, 8).requires_grad_()
    x = torch.randn(12, 96).bfloat16().requires_grad_()
    y = lk.qlora_linear(x, packed, state, a, b, 2.0, dropout_p=0.1, training=True)
    assert len(calls) == 1
    y.float().sum().backward()
    assert len(calls) == 2 and calls[0] == calls[1]  # backward: one mask for dx and dA, the forward's one


def test_auto_equals_reference_without_dropout(monkeypatch):
    packed, state, _ = quantized(40, 70)
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 70, generator=gen), torch.randn(40, 4, generator=gen)
    x = torch.randn(5, 70, generator=gen).bfloat16()
    got = lk.qlora_linear(x, packed, state, a, b, 0.5, training=True)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "reference")
    assert torch.equal(got, lk.qlora_linear(x, packed, state, a, b, 0.5, training=True))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests._models import save_model

    return save_model(tmp_path_factory.mktemp("llama") / "tiny")


def _count_op_calls(monkeypatch):
    from lora_kernels.ops import fused_linear

    calls = []
    real = fused_linear.qlora_linear
    monkeypatch.setattr(fused_linear, "qlora_linear", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def test_cpu_auto_runs_peft_forward_reference_runs_the_op(model_dir, monkeypatch):
    """On CPU under LORA_KERNELS_BACKEND=auto a patched layer runs PEFT's forward, exactly (no fallback warning: a
    path choice the report notes); under =reference it runs the op."""
    import warnings

    from tests._models import load_peft, step, token_batch

    pm = load_peft(model_dir)
    for module in pm.modules():  # keep bitsandbytes' CPU repacking out of this comparison
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    ids = token_batch()
    stock = step(pm, ids)
    report = lk.patch_peft_model(pm)
    assert len(report.patched) == 14 and not report.fallbacks
    assert any("run PEFT's forward" in n for n in report.notes) and "note:" in str(report)
    calls = _count_op_calls(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lk.FallbackWarning)
        got = step(pm, ids)
        pm.eval()
        with torch.no_grad():
            pm(input_ids=ids)
    assert calls == []
    assert torch.equal(got[0], stock[0]) and all(torch.equal(got[2][n], stock[2][n]) for n in stock[2])
    monkeypatch.setenv("LORA_KERNELS_PATCH_CPU", "op")  # the op for every call
    with torch.no_grad():
        pm(input_ids=ids)
    assert len(calls) == 14
    assert not lk.patch_peft_model(pm).notes
    monkeypatch.setenv("LORA_KERNELS_PATCH_CPU", "peft")
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "reference")  # so does the reference backend
    pm.train()
    step(pm, ids)
    assert len(calls) == 28
    assert not lk.patch_peft_model(pm).notes
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "auto")
    monkeypatch.setenv("LORA_KERNELS_PATCH_CPU", "gpu")
    with pytest.raises(ValueError, match="LORA_KERNELS_PATCH_CPU='gpu' is not 'peft'"):
        lk.patch_peft_model(pm)
