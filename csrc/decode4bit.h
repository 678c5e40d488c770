// bitsandbytes 4-bit (NF4/FP4) decode arithmetic, shared by the CUDA kernels and a host test.
//
// Every function here is __host__ __device__ and uses only integer and IEEE fp32 operations, so
// g++ compiles the same code the GPU runs and tests/test_csrc_decode.py checks it bit-exact
// against lora_kernels.reference.dequantize_4bit_ref.
//
// Format (bitsandbytes 0.50): element i of the row-major [N, K] weight is in byte i/2, the HIGH
// nibble for even i; block = i / blocksize over the flat index; nested scales are
// code2[absmax_u8[b]] * absmax2[b / blocksize2] + offset, in fp32, in that order.
#pragma once
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define LK_HD __host__ __device__ __forceinline__
#else
#define LK_HD inline
#endif

namespace lk {

// ------------------------------------------------------------------------------ fp32 helpers

LK_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}

LK_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

// Explicit roundings: nvcc would otherwise contract a*b+c into one FMA, which bitsandbytes
// and the PyTorch reference do not do.
LK_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  volatile float r = a * b;
  return r;
#endif
}

LK_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  volatile float r = a + b;
  return r;
#endif
}

// fp32 -> bf16 bits, round to nearest even (NaN kept quiet).
LK_HD uint16_t f32_to_bf16_bits(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

// fp32 -> fp16 bits, round to nearest even, with subnormals and overflow to inf.
LK_HD uint16_t f32_to_f16_bits(float f) {
  uint32_t u = f32_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {                                     // below 2^-14: fp16 subnormal or 0
    if (a < 0x33000000u) return (uint16_t)sign;              // below 2^-25: rounds to 0
    uint32_t e = a >> 23;
    uint32_t mant = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - e;  // 14..24: value = mant * 2^(e-150), unit 2^-24
    uint32_t q = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return (uint16_t)(sign | q);
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u);  // round the 13 dropped mantissa bits
  return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
}

template <bool BF16>
LK_HD uint16_t f32_to_bits(float f) {
  return BF16 ? f32_to_bf16_bits(f) : f32_to_f16_bits(f);
}

// ------------------------------------------------------------------------------ scales and elements

LK_HD uint32_t nibble_at(const uint8_t* packed, uint32_t i) {
  uint32_t byte = packed[i >> 1];
  return (i & 1u) ? (byte & 0xfu) : (byte >> 4);
}

// fp32 absmax of block b; nested: code2[absmax_u8[b]] * absmax2[b / blocksize2] + offset.
LK_HD float block_scale(const void* absmax, bool nested, const float* code2, const float* absmax2,
                        uint32_t blocksize2, float offset, uint32_t b) {
  if (!nested) return static_cast<const float*>(absmax)[b];
  uint32_t a = static_cast<const uint8_t*>(absmax)[b];
  return add_rn(mul_rn(code2[a], absmax2[b / blocksize2]), offset);
}

// One weight element exactly as bitsandbytes: fp32 code * fp32 scale, rounded once to the dtype.
template <bool BF16>
LK_HD uint16_t decode_exact_bits(const float* code, uint32_t nibble, float scale) {
  return f32_to_bits<BF16>(mul_rn(code[nibble], scale));
}

// ------------------------------------------------------------------------------ register table (PRMT)

// PTX prmt.b32 in its default mode: byte j of the result is byte (sel >> 4j) & 7 of {b:a};
// bit 3 of the selector nibble replicates that byte's sign bit.
LK_HD uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
#if defined(__CUDA_ARCH__)
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
#else
  uint64_t src = ((uint64_t)b << 32) | a;
  uint32_t out = 0;
  for (int j = 0; j < 4; ++j) {
    uint32_t s = (sel >> (4 * j)) & 0xfu;
    uint32_t byte = (uint32_t)(src >> (8 * (s & 7u))) & 0xffu;
    if (s & 8u) byte = (byte & 0x80u) ? 0xffu : 0u;
    out |= byte << (8 * j);
  }
  return out;
#endif
}

// The 16 codes as 16-bit values, split into low and high bytes, entries 0-7 (A) and 8-15 (B):
// eight registers, each a 4-entry byte table that PRMT indexes with 3-bit selectors.
struct Table {
  uint32_t la0, la1, lb0, lb1;  // low bytes of codes 0-3, 4-7, 8-11, 12-15
  uint32_t ha0, ha1, hb0, hb1;  // high bytes
};

template <bool BF16>
LK_HD Table make_table(const float* code) {
  uint32_t lo[4] = {0, 0, 0, 0}, hi[4] = {0, 0, 0, 0};
  for (int i = 0; i < 16; ++i) {
    uint32_t v = f32_to_bits<BF16>(code[i]);
    lo[i >> 2] |= (v & 0xffu) << (8 * (i & 3));
    hi[i >> 2] |= (v >> 8) << (8 * (i & 3));
  }
  Table t;
  t.la0 = lo[0]; t.la1 = lo[1]; t.lb0 = lo[2]; t.lb1 = lo[3];
  t.ha0 = hi[0]; t.ha1 = hi[1]; t.hb0 = hi[2]; t.hb1 = hi[3];
  return t;
}

// Codes of the four nibbles in the low 16 bits of a packed word. idx holds each nibble's low three
// bits; dsel picks, per byte, table A (selector j) or B (j + 4) by the nibble's top bit.
// Nibble 2j is the LOW nibble of byte j (an odd element), so the pairs come out swapped back
// into element order: p01 = (elem 0 | elem 1 << 16), p23 likewise.
LK_HD void lookup4(const Table& t, uint32_t idx, uint32_t dsel, uint32_t& p01, uint32_t& p23) {
  uint32_t lo = prmt(prmt(t.la0, t.la1, idx), prmt(t.lb0, t.lb1, idx), dsel);
  uint32_t hi = prmt(prmt(t.ha0, t.ha1, idx), prmt(t.hb0, t.hb1, idx), dsel);
  p01 = prmt(lo, hi, 0x4051u);
  p23 = prmt(lo, hi, 0x6273u);
}

// Eight consecutive elements (one little-endian 32-bit word of packed bytes) -> four 16-bit pairs
// in element order: out[j] = code[e_2j] | code[e_2j+1] << 16, codes rounded to bf16/fp16.
// `base` is 0x32103210; a kernel passes it in a register so one LOP3 builds dsel.
LK_HD void decode8(const Table& t, uint32_t q, uint32_t out[4], uint32_t base = 0x32103210u) {
  uint32_t idx = q & 0x77777777u;
  uint32_t dsel = ((q >> 1) & 0x44444444u) | base;
  lookup4(t, idx, dsel, out[0], out[1]);
  lookup4(t, idx >> 16, dsel >> 16, out[2], out[3]);
}

// The exact decode of one packed byte: its two fp32 codes (even element first) times the fp32 block
// scale, each product rounded once to the dtype, as bitsandbytes dequantizes; packed even | odd << 16.
template <bool BF16>
LK_HD uint32_t pack_exact(float even, float odd, float scale) {
#if defined(__CUDA_ARCH__)
  const float e = __fmul_rn(even, scale), o = __fmul_rn(odd, scale);
  uint32_t d;
  if (BF16)
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(o), "f"(e));  // first source to the high half
  else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(o), "f"(e));
  return d;
#else
  return (uint32_t)f32_to_bits<BF16>(mul_rn(even, scale)) | (uint32_t)f32_to_bits<BF16>(mul_rn(odd, scale)) << 16;
#endif
}

// Host model of the kernel's packed multiply (HMUL2): both 16-bit inputs are exact in fp32 and so
// is their product, so one fp32 multiply and one rounding give the hardware's result.
template <bool BF16>
LK_HD float bits_to_f32(uint16_t v) {
  if (BF16) return bits_f32((uint32_t)v << 16);
  uint32_t sign = (uint32_t)(v & 0x8000u) << 16, e = (v >> 10) & 0x1fu, m = v & 0x3ffu;
  if (e == 0x1f) return bits_f32(sign | 0x7f800000u | (m << 13));
  if (e == 0) {
    float f = (float)m * (1.0f / 16777216.0f);  // m * 2^-24, exact
    return sign ? -f : f;
  }
  return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

template <bool BF16>
LK_HD uint16_t mul_bits(uint16_t a, uint16_t b) {
  return f32_to_bits<BF16>(bits_to_f32<BF16>(a) * bits_to_f32<BF16>(b));
}

}  // namespace lk
