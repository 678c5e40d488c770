"""csrc/decode4bit.h on the host: g++ compiles the same __host__ __device__ arithmetic the CUDA kernels
run, and it must be bit-exact against lora_kernels.reference on NF4 and FP4, nested and not."""
import ctypes
import os
import shutil
import subprocess

import pytest
import torch

from lora_kernels.nf4 import block_scales, read_quant_state
from lora_kernels.reference import dequantize_4bit_ref

from tests._util import quantized

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

WRAPPER = r"""
#include "decode4bit.h"
extern "C" {
// The generic kernel's arithmetic: one exact decode per element.
void host_dequant_exact(const uint8_t* packed, const float* code, const void* absmax, int nested,
                        const float* code2, const float* absmax2, int bs2, float offset, int bs,
                        long long numel, int bf16, uint16_t* out) {
  for (long long i = 0; i < numel; ++i) {
    float s = lk::block_scale(absmax, nested, code2, absmax2, bs2, offset, (uint32_t)(i / bs));
    uint32_t nib = lk::nibble_at(packed, (uint32_t)i);
    out[i] = bf16 ? lk::decode_exact_bits<true>(code, nib, s) : lk::decode_exact_bits<false>(code, nib, s);
  }
}
void host_block_scales(const void* absmax, int nested, const float* code2, const float* absmax2, int bs2,
                       float offset, long long blocks, float* out) {
  for (long long b = 0; b < blocks; ++b) out[b] = lk::block_scale(absmax, nested, code2, absmax2, bs2, offset, b);
}
// The fast kernel's register table: PRMT lookups of 32-bit words (8 codes each, element order).
void host_decode8_codes(const uint32_t* words, long long nwords, const float* code, int bf16, uint16_t* out) {
  lk::Table t = bf16 ? lk::make_table<true>(code) : lk::make_table<false>(code);
  for (long long w = 0; w < nwords; ++w) {
    uint32_t p[4];
    lk::decode8(t, words[w], p);
    for (int j = 0; j < 4; ++j) { out[8 * w + 2 * j] = p[j] & 0xffff; out[8 * w + 2 * j + 1] = p[j] >> 16; }
  }
}
// The fast kernel's exact decode: per packed byte, its two fp32 codes from the byte table times the block
// scale, each rounded once (pack_exact); blocksizes are even, so a byte never spans two blocks.
void host_decode_bytes_exact(const uint8_t* packed, long long nbytes, const float* code, const float* scales,
                             int bs, int bf16, uint32_t* out) {
  for (long long i = 0; i < nbytes; ++i) {
    const uint32_t byte = packed[i];
    const float s = scales[(2 * i) / bs];
    out[i] = bf16 ? lk::pack_exact<true>(code[byte >> 4], code[byte & 15], s)
                  : lk::pack_exact<false>(code[byte >> 4], code[byte & 15], s);
  }
}
void host_round(const float* x, long long n, int bf16, uint16_t* out) {
  for (long long i = 0; i < n; ++i) out[i] = bf16 ? lk::f32_to_bf16_bits(x[i]) : lk::f32_to_f16_bits(x[i]);
}
void host_mul(const uint16_t* a, const uint16_t* b, long long n, int bf16, uint16_t* out) {
  for (long long i = 0; i < n; ++i) out[i] = bf16 ? lk::mul_bits<true>(a[i], b[i]) : lk::mul_bits<false>(a[i], b[i]);
}
}
"""


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found: the host decode test compiles csrc/decode4bit.h with it")
    d = tmp_path_factory.mktemp("decode_host")
    src, lib = d / "wrapper.cpp", d / "libdecode_host.so"
    src.write_text(WRAPPER)
    # -ffp-contract=off: no fused multiply-add, as on the GPU where the header rounds explicitly.
    cmd = [gxx, "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Werror", "-shared", "-fPIC",
           "-I", CSRC, str(src), "-o", str(lib)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"g++ failed on csrc/decode4bit.h:\n{res.stderr}"
    return ctypes.CDLL(str(lib))


def _p(t):
    return ctypes.c_void_p(t.data_ptr())


def _bits(t):
    return t.view(torch.int16).to(torch.int32) & 0xFFFF


CASES = [(qt, nested, bs) for qt in ("nf4", "fp4") for nested in (False, True) for bs in (64, 256)]


@pytest.mark.parametrize("quant_type,nested,blocksize", CASES)
@pytest.mark.parametrize("shape", [(48, 320), (33, 47), (7, 4096 + 96)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exact_decode_matches_reference(host_lib, quant_type, nested, blocksize, shape, dtype):
    n, k = shape
    packed, state, _ = quantized(n, k, quant_type=quant_type, nested=nested, blocksize=blocksize, seed=n + k)
    q = read_quant_state(packed, state)
    numel = n * k
    scales = torch.empty(q.absmax.numel(), dtype=torch.float32)
    code2 = q.code2 if nested else torch.zeros(1)
    absmax2 = q.absmax2 if nested else torch.zeros(1)
    offset = float(q.offset) if nested else 0.0
    host_lib.host_block_scales(_p(q.absmax), int(nested), _p(code2), _p(absmax2), int(q.blocksize2 or 1),
                               ctypes.c_float(offset), ctypes.c_longlong(scales.numel()), _p(scales))
    assert torch.equal(scales.view(torch.int32), block_scales(q).view(torch.int32)), "block scales differ"
    out = torch.empty(numel, dtype=torch.int16)
    host_lib.host_dequant_exact(_p(q.packed), _p(q.code), _p(q.absmax), int(nested), _p(code2), _p(absmax2),
                                int(q.blocksize2 or 1), ctypes.c_float(offset), blocksize, ctypes.c_longlong(numel),
                                int(dtype == torch.bfloat16), _p(out))
    ref = dequantize_4bit_ref(q, dtype).reshape(-1)
    assert torch.equal(out, ref.view(torch.int16)), f"{(out != ref.view(torch.int16)).sum()} elements differ"


@pytest.mark.parametrize("quant_type,nested,blocksize", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_exact_decode_matches_reference(host_lib, quant_type, nested, blocksize, dtype):
    """The exact fast kernel's per-byte arithmetic (pack_exact) gives bitsandbytes' weights bit for bit."""
    n, k = 40, 512
    packed, state, _ = quantized(n, k, quant_type=quant_type, nested=nested, blocksize=blocksize, seed=3)
    q = read_quant_state(packed, state)
    scales = block_scales(q).contiguous()
    out = torch.empty(n * k // 2, dtype=torch.int32)
    host_lib.host_decode_bytes_exact(_p(q.packed), ctypes.c_longlong(out.numel()), _p(q.code.float().contiguous()),
                                     _p(scales), blocksize, int(dtype == torch.bfloat16), _p(out))
    ref = dequantize_4bit_ref(q, dtype).reshape(-1).view(torch.int32)  # little-endian: even element low
    assert torch.equal(out, ref), f"{(out != ref).sum()} byte pairs differ"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_register_table_decodes_every_byte(host_lib, quant_type, dtype):
    """decode8 over words holding all 256 byte values, in every byte position, against code[nibble]."""
    _, state, _ = quantized(16, 64, quant_type=quant_type, nested=False)
    code = state.code.float().contiguous()
    b = torch.arange(256, dtype=torch.int64)
    words = torch.stack([b, (b + 17) % 256, (b * 7 + 3) % 256, 255 - b], dim=1).to(torch.uint8).reshape(-1)
    nwords = words.numel() // 4
    out = torch.empty(nwords * 8, dtype=torch.int16)
    host_lib.host_decode8_codes(_p(words), ctypes.c_longlong(nwords), _p(code), int(dtype == torch.bfloat16), _p(out))
    nib = torch.stack([words >> 4, words & 0xF], dim=1).reshape(-1).long()  # element order: high nibble first
    want = code[nib].to(dtype).view(torch.int16)
    assert torch.equal(out, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_and_packed_multiply(host_lib, dtype):
    """The header's fp32 -> 16-bit rounding equals torch's (RNE, subnormals, overflow); mul_bits, the host
    model of the prescaled kernel's HMUL2, is one rounding of the exact product."""
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(4000, generator=gen) * 10.0 ** torch.randint(-9, 6, (4000,), generator=gen),
                   torch.tensor([0.0, -0.0, 65504.0, 65520.0, 1e6, 6e-8, 3e-8, 2.9e-8, float("inf"), -float("inf")])])
    out = torch.empty(x.numel(), dtype=torch.int16)
    host_lib.host_round(_p(x), ctypes.c_longlong(x.numel()), int(dtype == torch.bfloat16), _p(out))
    assert torch.equal(out, x.to(dtype).view(torch.int16))
    a, s = x[:4000].to(dtype), x[:4000].flip(0).to(dtype).abs().clamp(max=4.0)
    prod = torch.empty(4000, dtype=torch.int16)
    host_lib.host_mul(_p(a.view(torch.int16)), _p(s.view(torch.int16)), ctypes.c_longlong(4000),
                      int(dtype == torch.bfloat16), _p(prod))
    assert torch.equal(prod, (a.float() * s.float()).to(dtype).view(torch.int16))
