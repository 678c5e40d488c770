"""The bitsandbytes 4-bit format facts (checked against the installed version) and dequantize_4bit."""
import bitsandbytes.functional as bnbF
import pytest
import torch

import lora_kernels as lk
from lora_kernels.nf4 import block_scales, is_cpu_repacked, read_quant_state
from lora_kernels.reference import dequantize_4bit_ref
from tests._util import bnb_dequantize, quantized


def test_packing_layout_facts():
    """Element i sits in byte i//2, high nibble for even i; blocks run over the flat index (across rows)."""
    n, k, bs = 3, 37, 32  # K % blocksize != 0: blocks span rows
    _, state, _ = quantized(n, k, blocksize=bs, nested=False)
    codes = torch.randint(0, 16, (n * k,))
    flat = torch.cat([codes, codes.new_zeros(1)])  # pad to whole bytes
    packed = ((flat[0::2] << 4) | flat[1::2]).to(torch.uint8).reshape(-1, 1)
    state.absmax = torch.rand(state.absmax.shape) + 0.5
    got = bnbF.dequantize_4bit(packed, state).float().reshape(-1)
    expected = state.code[codes] * state.absmax.repeat_interleave(bs)[: n * k]
    torch.testing.assert_close(got, expected.to(state.dtype).float(), rtol=0, atol=0)
    assert packed.shape == (-(-n * k // 2), 1) and packed.dtype == torch.uint8


def test_nested_absmax_facts():
    n, k = 16, 256
    packed, state, _ = quantized(n, k, nested=True)
    assert state.nested and state.absmax.dtype == torch.uint8 and state.state2.blocksize == 256
    assert state.offset.dim() == 0 and state.offset.dtype == torch.float32
    idx = torch.arange(state.absmax.numel()) // state.state2.blocksize
    manual = state.state2.code[state.absmax.long()] * state.state2.absmax[idx] + state.offset
    got = block_scales(read_quant_state(packed, state))
    assert torch.equal(got, manual)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("n,k,bs", [(5, 70, 64), (3, 33, 32), (7, 129, 128), (4, 1000, 4096), (1, 1, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_reference_dequantize_is_bit_identical_to_bitsandbytes(quant_type, nested, n, k, bs, dtype):
    packed, state, expected = quantized(n, k, dtype=dtype, quant_type=quant_type, nested=nested, blocksize=bs)
    got = dequantize_4bit_ref(read_quant_state(packed, state), dtype)
    assert got.dtype == expected.dtype and torch.equal(got, expected)


def _bf16_truncate(x32):
    return (x32.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("n,k,bs", [(5, 70, 64), (3, 33, 32), (9, 300, 256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_dequantize_matches_bitsandbytes(monkeypatch, quant_type, nested, n, k, bs, dtype):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    packed, state, expected = quantized(n, k, dtype=dtype, quant_type=quant_type, nested=nested, blocksize=bs)
    got = lk.dequantize_4bit(packed, state)
    assert got.shape == (n, k) and got.dtype == dtype
    if dtype == torch.bfloat16 and not torch.cuda.is_available():
        # The interpreter converts fp32 -> bf16 by truncation (DESIGN.md): each element must be bitsandbytes'
        # round-to-nearest value or the truncated one, i.e. within one bf16 ulp of it.
        exact = dequantize_4bit_ref(read_quant_state(packed, state), torch.float32)
        ok = (got == expected) | (got == _bf16_truncate(exact))
        assert bool(ok.all()), f"{int((~ok).sum())} elements are neither rounded nor truncated fp32 values"
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("k", [160, 96])
def test_k_multiple_of_16_but_not_of_blocksize(backend, k):
    """bitsandbytes 0.50's CPU dequantize decodes (N, K) wrongly for such K, while the same bytes read as
    a flat (N*K,) tensor decode right: that flat decode is the oracle here, and ours must equal it."""
    w = torch.randn(24, k, generator=torch.Generator().manual_seed(k)).to(torch.float16)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    expected = bnb_dequantize(packed, state)
    got = lk.dequantize_4bit(packed, state)
    assert torch.equal(got, expected)
    # and it is a quantization of w: half NF4's widest code gap (1 - 0.7230) is below 0.14 of the block absmax
    absmax = w.float().reshape(-1, 64).abs().amax(1).repeat_interleave(64).view(24, k)
    assert bool(((got.float() - w.float()).abs() <= 0.17 * absmax + 1e-3).all())


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32, torch.int8])
def test_any_quant_storage_reads_the_same_bytes(backend, storage):
    n, k = 8, 64  # byte count divisible by every storage element size
    packed, state, expected = quantized(n, k, quant_storage=storage)
    assert packed.dtype == storage
    got = lk.dequantize_4bit(packed, state)
    as_bytes = lk.dequantize_4bit(packed.view(torch.uint8), state)
    assert torch.equal(got, as_bytes)
    assert torch.equal(dequantize_4bit_ref(read_quant_state(packed, state), expected.dtype), expected)


def test_params4bit_accepted(backend):
    import bitsandbytes as bnb

    w = torch.randn(12, 40, dtype=torch.bfloat16)
    p = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=64).to("cpu")
    assert p.quant_state is not None
    expected = bnbF.dequantize_4bit(p.data, p.quant_state)
    got = lk.dequantize_4bit(p, p.quant_state)
    assert torch.equal(got, lk.dequantize_4bit(p.data, p.quant_state))
    assert (got.float() - expected.float()).abs().max() <= expected.abs().max() / 128


def test_cpu_repacked_layout_is_detected_and_refused():
    packed, state, _ = quantized(4, 64)
    assert not is_cpu_repacked(state)
    state.packing_format_for_cpu = True
    assert is_cpu_repacked(state)
    with pytest.raises(ValueError, match="CPU-repacked"):
        lk.dequantize_4bit(packed, state)

    class Slotted:  # no instance dict: the flag is read with getattr
        __slots__ = ("packing_format_for_cpu",)

    flagged = Slotted()
    flagged.packing_format_for_cpu = True
    assert is_cpu_repacked(flagged) and not is_cpu_repacked(Slotted())

    class Repacked(type(state)):  # the flag as a class attribute, not on the instance
        packing_format_for_cpu = True

    state.__class__ = Repacked
    del state.packing_format_for_cpu
    assert is_cpu_repacked(state)


@pytest.mark.parametrize("nested", [False, True])
def test_read_quant_state_takes_fp32_tensors_as_they_are(nested):
    """Each call of the op reads the quant state again: tensors already fp32 and contiguous are used, not
    copied; others are converted (same values)."""
    packed, state, _ = quantized(8, 64, nested=nested)
    q = read_quant_state(packed, state)
    assert q.code is state.code
    if nested:
        assert q.code2 is state.state2.code and q.absmax2 is state.state2.absmax
        state.state2.code = state.state2.code.half()
        assert torch.equal(read_quant_state(packed, state).code2, state.state2.code.float())
    else:
        assert q.absmax is state.absmax
        state.absmax = state.absmax.half()
        got = read_quant_state(packed, state).absmax
        assert got.dtype == torch.float32 and torch.equal(got, state.absmax.float())
    state.code = state.code.repeat(2)[::2]  # a strided view: made contiguous
    got = read_quant_state(packed, state).code
    assert got.is_contiguous() and torch.equal(got, state.code)


def test_bad_quant_states_are_refused():
    packed, state, _ = quantized(4, 64, nested=False)
    with pytest.raises(ValueError, match="quant_state is None"):
        lk.dequantize_4bit(packed, None)
    state.quant_type = "int4"
    with pytest.raises(ValueError, match="unknown 4-bit quant_type 'int4'"):
        lk.dequantize_4bit(packed, state)
    state.quant_type = "nf4"
    with pytest.raises(ValueError, match="packed weight has 64 bytes but quant_state.shape 4x64 needs 128"):
        lk.dequantize_4bit(packed[:64], state)
    with pytest.raises(TypeError, match="output dtype"):
        lk.dequantize_4bit(packed, state, dtype=torch.int32)
    state.blocksize = 48
    with pytest.raises(ValueError, match="blocksize 48"):
        lk.dequantize_4bit(packed, state)
