// Decode-shape (M <= 16) QLoRA forward over a bitsandbytes 4-bit weight:
//
//   y[m, n] = x[m, :] . decode(W)[n, :] + scaling * xa[m, :] . b[n, :] + bias[n]
//
// Fast kernel: a CTA owns 16 rows of W (the M side of mma.m16n8k16) and its warps split K in
// 128-wide steps. Lane (g, t) loads 16 packed bytes (32 elements) of rows g and g+8 once, decodes
// them (a shared-memory byte table, PRMT over registers, or exactly: fp32 code * fp32 scale rounded
// once, as bitsandbytes) and feeds them to the tensor cores as the A operand; x (1 or 2 n8 tiles of
// tokens) is the B operand, read through L1. Loads run several steps ahead of the decode. Partial
// sums meet in shared memory, then the epilogue adds the LoRA term and the bias and stores y once.
// Generic kernel: one warp per row, element-wise exact decode; any K, alignment or blocksize.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <type_traits>
#include <utility>

#include "decode4bit.h"
#include "lk_csrc.h"

namespace {

constexpr int kRows = 16;      // W rows per CTA
constexpr int kStep = 128;     // k per warp step: 4 lanes x 32 elements
constexpr int kMaxWarps = 16;  // warps per CTA (split-K inside the CTA)
constexpr int kGenericWarps = 8;
constexpr int kTableWords = 256 * 32;              // 32 KB: 256 code pairs x 32 lanes, or 256 fp32 pairs x 16
// The fast kernel's decode (lk_decode_args.decode). kLoadsOnly is for measurement: the same loads, scales,
// shuffles, reduction and epilogue, but no table, decode or MMA (the output is meaningless), M <= 8 only.
constexpr int kShared = 0, kRegisters = 1, kExact = 2, kLoadsOnly = 3;

struct Params {
  lk_decode_args a;
  int log2_bs, log2_bs2;
  uint32_t base3210;  // 0x32103210, in a register rather than folded (see lk::decode8)
};

template <bool BF16>
struct Elem;
template <>
struct Elem<true> {
  using T = __nv_bfloat16;
  static __device__ __forceinline__ float load(const void* p, int64_t i) {
    return __bfloat162float(static_cast<const T*>(p)[i]);
  }
  static __device__ __forceinline__ void store(void* p, int64_t i, float v) {
    static_cast<T*>(p)[i] = __float2bfloat16_rn(v);
  }
};
template <>
struct Elem<false> {
  using T = __half;
  static __device__ __forceinline__ float load(const void* p, int64_t i) {
    return __half2float(static_cast<const T*>(p)[i]);
  }
  static __device__ __forceinline__ void store(void* p, int64_t i, float v) {
    static_cast<T*>(p)[i] = __float2half_rn(v);
  }
};

// Read-once stream: do not displace x from L1.
__device__ __forceinline__ uint4 ld_stream(const void* ptr) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(ptr));
  return v;
}

// Hides how v was computed, so the compiler keeps it in a register instead of recomputing it from
// threadIdx and the parameters inside the main loop (which it otherwise does, ~20 instructions a step).
__device__ __forceinline__ uint32_t opaque(uint32_t v) {
  asm volatile("" : "+r"(v));
  return v;
}

__device__ __forceinline__ uint32_t lds(uint32_t shared_addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(shared_addr));
  return v;
}

__device__ __forceinline__ float2 lds64(uint32_t shared_addr) {
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(v.x), "=f"(v.y) : "r"(shared_addr));
  return v;
}

// (s, s) as a packed 16-bit pair.
template <bool BF16>
__device__ __forceinline__ uint32_t pack_scale(float s) {
  uint32_t d;
  if (BF16)
    asm("cvt.rn.bf16x2.f32 %0, %1, %1;" : "=r"(d) : "f"(s));
  else
    asm("cvt.rn.f16x2.f32 %0, %1, %1;" : "=r"(d) : "f"(s));
  return d;
}

// a * s per 16-bit lane, one rounding. bf16 as fma(a, s, -0) so sm_80 has one instruction too.
template <bool BF16>
__device__ __forceinline__ uint32_t mul2(uint32_t a, uint32_t s) {
  uint32_t d;
  if (BF16)
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(s), "r"(0x80008000u));
  else
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(s));
  return d;
}

template <bool BF16>
__device__ __forceinline__ void mma16816(float c[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  if (BF16)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// y[m, n] = acc + scaling * xa . b + bias, rounded once to the dtype; xa and b point at token m's and row n's r
// LoRA elements (element steps xa_col, b_col), in global or shared memory; bias is used when a.bias is set.
template <bool BF16>
__device__ __forceinline__ void finish(const lk_decode_args& a, int m, int n, float acc, const void* xa,
                                       int64_t xa_col, const void* b, int64_t b_col, float bias) {
  using E = Elem<BF16>;
  if (a.r > 0) {
    float l = 0.f;
    for (int j = 0; j < a.r; ++j) l = fmaf(E::load(xa, j * xa_col), E::load(b, j * b_col), l);
    acc = fmaf(a.scaling, l, acc);
  }
  if (a.bias) acc += bias;
  E::store(a.out, m * a.out_row + n, acc);
}

// finish() with every operand from global memory.
template <bool BF16>
__device__ __forceinline__ void epilogue(const lk_decode_args& a, int m, int n, float acc) {
  using T = typename Elem<BF16>::T;
  finish<BF16>(a, m, n, acc, static_cast<const T*>(a.xa) + m * a.xa_row, a.xa_col,
               static_cast<const T*>(a.b) + n * a.b_row, a.b_col, a.bias ? Elem<BF16>::load(a.bias, n * a.bias_stride) : 0.f);
}

// The split-K partial sums of a CTA's warps meet in shared memory (red, from 0: the caller has synced after the
// loop); then each output (row, token) of the CTA is summed over the warps and handed to out(tok, n, row, sum).
template <int RT, int NT, typename Out>
__device__ __forceinline__ void reduce_partials(uint32_t* smem, const float (&acc)[RT][NT][4], const lk_decode_args& a,
                                                int row0, Out out) {
  constexpr int kCtaRows = kRows * RT;
  float(*red)[kCtaRows][16] = reinterpret_cast<float(*)[kCtaRows][16]>(smem);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int c = 8 * nt + 2 * t, r = kRows * rt + g;
      red[warp][r][c] = acc[rt][nt][0];
      red[warp][r][c + 1] = acc[rt][nt][1];
      red[warp][r + 8][c] = acc[rt][nt][2];
      red[warp][r + 8][c + 1] = acc[rt][nt][3];
    }
  __syncthreads();
  for (int e = threadIdx.x; e < kCtaRows * a.m; e += blockDim.x) {
    const int row = e % kCtaRows, tok = e / kCtaRows, n = row0 + row;
    if (n >= a.n) continue;
    float s = 0.f;
    for (int w = 0; w < nwarps; ++w) s += red[w][row][tok];
    out(tok, n, row, s);
  }
}

// One 128-wide step of a warp: 64 weight elements per lane (32 of row g, 32 of row g+8).
// SCALE_AFTER (blocksize >= 128: the whole step is one block per row): codes go to the tensor
// cores unscaled and the fp32 partial sums are scaled once. Otherwise (blocksize 64: the quad's
// step spans two blocks) the decoded pairs are scaled before the MMA, one packed multiply each.
// EXACT: decode applies the fp32 scale per element itself (sa, sb are fp32 bits).
template <bool BF16, int NT, bool SCALE_AFTER, bool EXACT, typename Decode>
__device__ __forceinline__ void mma_step(const Decode& decode, const uint4& qa, const uint4& qb,
                                         uint32_t sa, uint32_t sb, const uint32_t (&xr)[NT][16],
                                         float (&acc)[NT][4]) {
  float c[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int j = 0; j < 4; ++j) c[nt][j] = SCALE_AFTER ? 0.f : acc[nt][j];
  const uint32_t wa[4] = {qa.x, qa.y, qa.z, qa.w}, wb[4] = {qb.x, qb.y, qb.z, qb.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint32_t P[4], Q[4];
    decode(wa[i], P, sa);
    decode(wb[i], Q, sb);
    if (!SCALE_AFTER && !EXACT) {
#pragma unroll
      for (int j = 0; j < 4; ++j) P[j] = mul2<BF16>(P[j], sa), Q[j] = mul2<BF16>(Q[j], sb);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        mma16816<BF16>(c[nt], P[2 * h], Q[2 * h], P[2 * h + 1], Q[2 * h + 1], xr[nt][4 * i + 2 * h],
                       xr[nt][4 * i + 2 * h + 1]);
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    if (SCALE_AFTER) {
      const float fa = __uint_as_float(sa), fb = __uint_as_float(sb);
      acc[nt][0] = fmaf(fa, c[nt][0], acc[nt][0]);
      acc[nt][1] = fmaf(fa, c[nt][1], acc[nt][1]);
      acc[nt][2] = fmaf(fb, c[nt][2], acc[nt][2]);
      acc[nt][3] = fmaf(fb, c[nt][3], acc[nt][3]);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[nt][j] = c[nt][j];
    }
  }
}

// The byte -> codes table of the table decodes, built by the CTA in smem[0, kTableWords) (the caller syncs
// before use), and the decode of one packed word: eight elements -> four code pairs in element order.
// Per byte: PRMT extracts it, LEA makes the address (byte * 128 + this lane's copy), then the table load.
template <bool BF16, int DECODE>
struct Decoder {
  static constexpr bool EXACT = DECODE == kExact, SMEM = DECODE == kShared || EXACT;
  lk::Table tab;
  uint32_t base, lane_addr;
  __device__ __forceinline__ void operator()(uint32_t q, uint32_t (&o)[4], uint32_t s) const {
    if (EXACT) {
      const float f = __uint_as_float(s);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 c = lds64((__byte_perm(q, 0u, 0x4440u + j) << 7) + lane_addr);
        o[j] = lk::pack_exact<BF16>(c.x, c.y, f);
      }
    } else if (SMEM) {
      o[0] = lds((__byte_perm(q, 0u, 0x4440u) << 7) + lane_addr);
      o[1] = lds((__byte_perm(q, 0u, 0x4441u) << 7) + lane_addr);
      o[2] = lds((__byte_perm(q, 0u, 0x4442u) << 7) + lane_addr);
      o[3] = lds((__byte_perm(q, 0u, 0x4443u) << 7) + lane_addr);
    } else {
      lk::decode8(tab, q, o, base);
    }
  }
};

template <bool BF16, int DECODE>
__device__ __forceinline__ Decoder<BF16, DECODE> make_decoder(const float* code, uint32_t* smem, uint32_t base,
                                                             int lane) {
  using D = Decoder<BF16, DECODE>;
  D d;
  d.tab = lk::make_table<BF16>(code);
  d.base = base;
  if (D::EXACT) {
    for (int byte = threadIdx.x; byte < 256; byte += blockDim.x) {
      // element order: the high nibble is the even element
      const uint32_t hi = __float_as_uint(__ldg(code + (byte >> 4))), lo = __float_as_uint(__ldg(code + (byte & 15)));
      uint4* dst = reinterpret_cast<uint4*>(smem + 32 * byte);
#pragma unroll
      for (int j = 0; j < 8; ++j) dst[j] = make_uint4(hi, lo, hi, lo);
    }
  } else if (D::SMEM) {
    for (int byte = threadIdx.x; byte < 256; byte += blockDim.x) {
      uint32_t o[4];
      lk::decode8(d.tab, (uint32_t)byte, o, base);  // byte in byte 0: o[0] = code[hi] | code[lo] << 16
      uint4* dst = reinterpret_cast<uint4*>(smem + 32 * byte);
#pragma unroll
      for (int j = 0; j < 8; ++j) dst[j] = make_uint4(o[0], o[0], o[0], o[0]);
    }
  }
  d.lane_addr = opaque(static_cast<uint32_t>(__cvta_generic_to_shared(smem)) + (D::EXACT ? 8u * (lane & 15) : 4u * lane));
  return d;
}

// Lane (g, t)'s first step at kb0: its 16 packed bytes of rows g and g + 8 of each row tile (rows past N re-read
// row N - 1; their sums are never stored), and the flat index of the element whose block scale it fetches: row
// g or g + 8 by t's low bit, the step's first or second 64 elements by its high bit.
template <int RT>
__device__ __forceinline__ void w_start(const lk_decode_args& a, int row0, int kb0, int g, int t, uint32_t (&fs)[RT],
                                        const uint8_t* (&pa)[RT], const uint8_t* (&pb)[RT]) {
  const int K = a.k;
#pragma unroll
  for (int rt = 0; rt < RT; ++rt) {
    const int ra = min(row0 + kRows * rt + g, a.n - 1), rb = min(row0 + kRows * rt + g + 8, a.n - 1);
    fs[rt] = opaque((uint32_t)((t & 1) ? rb : ra) * (uint32_t)K + 32u * (t & 2) + kb0);
    pa[rt] = a.packed + (size_t)ra * (uint32_t)(K >> 1) + (kb0 >> 1) + 16 * t;
    pb[rt] = a.packed + (size_t)rb * (uint32_t)(K >> 1) + (kb0 >> 1) + 16 * t;
  }
}

// Steps of W (and their scales) in flight per warp, and of x. One 16-row tile with one token tile keeps
// three steps of W in flight beyond the one it decodes (3 KB per warp: HBM latency times the SM's share of
// bandwidth is about 30 KB per SM, at 16 warps per SM). Two token tiles (64 registers of x per step) leave
// room for one step ahead with one row tile and none with two: deeper rings spilled (8-56 B of stack).
// DEPTH (M <= 8 only, for measurement) overrides the W ring: 1 (no step ahead), 2 or 4.
template <int NT, int RT, int DEPTH>
struct Depth {
  static constexpr int w = DEPTH ? DEPTH : RT == 2 ? 1 : NT == 1 ? 4 : 2;
  static constexpr int x = NT == 1 && w % 2 == 0 ? 2 : 1;
};

template <bool BF16, int NT, int RT, bool NESTED, bool SCALE_AFTER, int DECODE, int DEPTH>
__global__ void __launch_bounds__(kMaxWarps * 32) decode_fast_kernel(const Params p) {
  constexpr bool LOADS = DECODE == kLoadsOnly;
  constexpr bool SMEM = DECODE != kRegisters && !LOADS, EXACT = DECODE == kExact;
  static_assert(!(EXACT && SCALE_AFTER), "the exact decode scales each element before rounding it");
  using T = typename Elem<BF16>::T;
  constexpr int kCtaRows = kRows * RT;  // RT row tiles per warp share each x fragment (M > 8: halves x traffic)
  constexpr int kRed = kMaxWarps * kCtaRows * 16;
  constexpr int DW = Depth<NT, RT, DEPTH>::w, DX = Depth<NT, RT, DEPTH>::x;
  static_assert(DW % DX == 0, "the x ring must divide the W ring");
  // SMEM: the 256 byte -> code-pair table, one copy per lane (entry-major, so the 32 lanes of a warp
  // always hit 32 different banks); EXACT: byte -> the two fp32 codes, one copy per lane of a half-warp
  // (a 64-bit load serves 16 lanes at a time). Afterwards the split-K partial sums. Else only the latter.
  __shared__ __align__(16) uint32_t smem[SMEM && kTableWords > kRed ? kTableWords : kRed];
  const lk_decode_args& a = p.a;
  const int K = a.k;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * kCtaRows;
  const uint32_t base = p.base3210;
  // A step covers 64 elements per (row, block) pair of lanes (t = 0,1 and t = 2,3): each lane
  // computes one scale per row tile, for row g or g+8 by t's low bit and its pair's block, and the
  // quad swaps them.
  const int src_a = (int)opaque((lane & ~3) | (t & 2)), src_b = src_a | 1;
  const int stride = (int)opaque(nwarps * kStep);
  const int wstep = stride >> 1;
  const int kb0 = warp * kStep;
  // Full 128-wide steps of this warp (kb0, kb0 + stride, ...); a 64-wide tail may follow.
  const int nfull = K - kb0 >= kStep ? (K - kb0 - kStep) / stride + 1 : 0;
  uint32_t fs[RT];  // flat index of the element whose block scale this lane fetches, at the next issued step
  const uint8_t* pa[RT];
  const uint8_t* pb[RT];
  w_start<RT>(a, row0, kb0, g, t, fs, pa, pb);
  const T* xp[NT];
  bool xok[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int tok = g + 8 * nt;
    xok[nt] = tok < a.m;
    xp[nt] = static_cast<const T*>(a.x) + (int64_t)min(tok, a.m - 1) * a.x_row + kb0 + 32 * t;
  }

  // One step's loads: W rows g and g+8 of each row tile, and the raw block scale (fp32 absmax bits, or the
  // nested byte with its absmax2) that this lane converts when the step is decoded.
  struct Wq {
    uint4 a[RT], b[RT];
    uint32_t s[RT];
    float s2[RT];
  };
  struct Xq {
    uint32_t r[NT][16];  // tokens >= M keep zeros
  };
  // With no step in flight (two row tiles) the scales load in the step, as the registers allow no more.
  constexpr bool kEarlyScale = DW > 1;
  auto load_raw_scale = [&](Wq& w, int rt, uint32_t f) {
    const uint32_t b = f >> p.log2_bs;
    if (NESTED) {
      w.s[rt] = __ldg(static_cast<const uint8_t*>(a.absmax) + b);
      w.s2[rt] = __ldg(a.absmax2 + (b >> p.log2_bs2));
    } else {
      w.s[rt] = __float_as_uint(__ldg(static_cast<const float*>(a.absmax) + b));
    }
  };
  auto issue_w = [&](Wq& w, bool live) {
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
      if (live) w.a[rt] = ld_stream(pa[rt]), w.b[rt] = ld_stream(pb[rt]);
      if (kEarlyScale) load_raw_scale(w, rt, fs[rt]);
      pa[rt] += wstep, pb[rt] += wstep, fs[rt] += stride;
    }
  };
  auto issue_x = [&](Xq& x, bool live) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      if (xok[nt] && live) {
        const uint4* v = reinterpret_cast<const uint4*>(xp[nt]);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint4 u = __ldg(v + j);
          x.r[nt][4 * j] = u.x, x.r[nt][4 * j + 1] = u.y, x.r[nt][4 * j + 2] = u.z, x.r[nt][4 * j + 3] = u.w;
        }
      }
      xp[nt] += stride;
    }
  };
  Wq wr[DW];
  Xq xr[DX];
#pragma unroll
  for (int d = 0; d < DW; ++d)
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) wr[d].a[rt] = wr[d].b[rt] = make_uint4(0, 0, 0, 0), wr[d].s[rt] = 0, wr[d].s2[rt] = 0.f;
#pragma unroll
  for (int d = 0; d < DX; ++d)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int j = 0; j < 16; ++j) xr[d].r[nt][j] = 0u;
  // The first steps' loads go out before the table is built, so their latency overlaps it.
#pragma unroll
  for (int d = 0; d < DW - 1; ++d)
    if (d < nfull) issue_w(wr[d], true);
#pragma unroll
  for (int d = 0; d < DX - 1; ++d)
    if (d < nfull) issue_x(xr[d], true);

  const Decoder<BF16, DECODE> decode = make_decoder<BF16, DECODE>(a.code, smem, base, lane);
  if (SMEM) __syncthreads();
  const float offset = NESTED ? __ldg(a.offset) : 0.f;
  float acc[RT][NT][4];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) acc[rt][nt][0] = acc[rt][nt][1] = acc[rt][nt][2] = acc[rt][nt][3] = 0.f;
  auto step = [&](Wq& w, const Xq& x) {
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
      if (!kEarlyScale) load_raw_scale(w, rt, fs[rt] - stride);  // fs has moved on to the next step
      // nested: bitsandbytes' order and roundings, as lk::block_scale (host-tested) computes them
      const float s = NESTED ? lk::add_rn(lk::mul_rn(__ldg(a.code2 + w.s[rt]), w.s2[rt]), offset)
                             : __uint_as_float(w.s[rt]);
      const uint32_t s2 = SCALE_AFTER || EXACT ? __float_as_uint(s) : pack_scale<BF16>(s);
      const uint32_t sa = __shfl_sync(0xffffffffu, s2, src_a), sb = __shfl_sync(0xffffffffu, s2, src_b);
      if constexpr (LOADS) {  // keep every loaded word live with one XOR each, nothing more
        uint32_t h = sa ^ sb ^ w.a[rt].x ^ w.a[rt].y ^ w.a[rt].z ^ w.a[rt].w ^ w.b[rt].x ^ w.b[rt].y ^ w.b[rt].z ^ w.b[rt].w;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int j = 0; j < 16; ++j) h ^= x.r[nt][j];
        acc[rt][0][0] += __uint_as_float(h & 0x3f7fffffu);
      } else {
        mma_step<BF16, NT, SCALE_AFTER, EXACT>(decode, w.a[rt], w.b[rt], sa, sb, x.r, acc[rt]);
      }
    }
  };

  // Step j decodes ring slot j % DW (x: j % DX) while the loads of step j + DW - 1 (x: j + DX - 1) go out.
  // Unrolled by DW so every slot index is a compile-time constant (registers, not local memory).
  for (int j0 = 0; j0 < nfull; j0 += DW) {
#pragma unroll
    for (int u = 0; u < DW; ++u) {
      const int j = j0 + u;
      if (j >= nfull) break;
      if (j + DW - 1 < nfull) issue_w(wr[(u + DW - 1) % DW], true);
      if (j + DX - 1 < nfull) issue_x(xr[(u + DX - 1) % DX], true);
      step(wr[u], xr[u % DX]);
    }
  }
  if (kb0 + nfull * stride < K) {  // K % 128 == 64 (blocksize 64 only): lanes t = 2, 3 are past the row's end
    const bool live = t < 2;
    // Lanes 2,3 fetch an in-range scale they do not use.
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) fs[rt] -= 32u * (t & 2);
    Wq w;
    Xq x;
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) w.a[rt] = w.b[rt] = make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int j = 0; j < 16; ++j) x.r[nt][j] = 0u;
    issue_w(w, live);
    issue_x(x, live);
    step(w, x);
  }

  if (SMEM) __syncthreads();  // every warp is done with the table before it holds partial sums
  reduce_partials<RT, NT>(smem, acc, a, row0, [&](int tok, int n, int, float sum) { epilogue<BF16>(a, tok, n, sum); });
}

// cp.async (sm_80+): global -> shared copies that complete in commit groups; waiting for all but the newest
// N groups (DEPBAR.LE) leaves those in flight. Register loads cannot: ptxas puts a ring's loads on one
// scoreboard, and a wait on it waits for every load on it (csrc/sass_count.py's reach check).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, uint32_t bytes) {  // 16, or 0: zeros
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ uint4 lds128(uint32_t a) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a));
  return v;
}
__device__ __forceinline__ float ldsf(uint32_t a) { return __uint_as_float(lds(a)); }

// The async kernel's shared memory, in bytes: [decode table][code2, offset][one ring of stages per warp];
// the split-K partial sums reuse it from 0 after the loop. A stage holds one 128-wide step of a warp's
// loads from HBM: W [row tile][row g | g + 8][lane] 16 B, raw scales [row tile][lane] 4 B (nested: the
// aligned word holding the byte, then absmax2). x stays a register load: it comes from L1/L2, whose latency
// the other warps hide, and in shared memory it would cost a CTA per SM at M = 16.
struct AsyncLayout {
  int stages, table, code2, w, stage, per_warp;
  __host__ __device__ constexpr AsyncLayout(int decode, bool nested, int rt)
      : stages(4),
        table(decode == kExact || decode == kShared ? kTableWords * 4 : 0),
        code2(nested ? 256 * 4 + 16 : 0),  // + the offset, padded to 16 B
        w(rt * 1024),
        stage(w + rt * 128 * (nested ? 2 : 1)),
        per_warp(stages * stage) {}
  __host__ __device__ int rings_end(int warps) const { return table + code2 + warps * per_warp; }
  // Total bytes: after the rings, the bias of the CTA's rows (fp32) and `lora` bytes of LoRA operands.
  __host__ __device__ int bytes(int warps, int rt, int lora) const {
    const int red = warps * kRows * rt * 16 * 4, used = rings_end(warps) + kRows * rt * 4 + lora;
    return used > red ? used : red;
  }
};

// The epilogue's LoRA operands (this CTA's rows of b, and xa) are copied into shared memory after the rings
// with the last prologue stage, when they are 16-bit pairs a 4-byte cp.async can take and r <= kLoraMaxR: the register
// ring's epilogue waits on r dependent loads (the LoRA term was 3.5 of its 29.8 us at r = 16 on the H200).
constexpr int kLoraMaxR = 64;
__host__ __device__ inline int lora_smem_bytes(const lk_decode_args& a, int cta_rows) {
  const bool fits = a.r > 0 && a.r <= kLoraMaxR && a.r % 2 == 0 && a.b_col == 1 && a.xa_col == 1 &&
                    a.b_row % 2 == 0 && a.xa_row % 2 == 0 && (reinterpret_cast<uintptr_t>(a.b) & 3u) == 0 &&
                    (reinterpret_cast<uintptr_t>(a.xa) & 3u) == 0;
  return fits ? ((cta_rows + a.m) * a.r * 2 + 15) / 16 * 16 : 0;
}

// Warps per CTA of the async kernel: two row tiles need more than the 128 registers a thread of a 16-warp CTA
// may have (they spilled), so at most 8 warps (255 registers). __launch_bounds__'s one CTA per SM: without it
// ptxas held the sm_80 build to 64 registers and spilled.
template <int RT>
constexpr int kAsyncMaxWarps = RT == 2 ? 8 : kMaxWarps;

// decode_fast_kernel's computation with the loop's HBM loads (W and its raw block scales) copied by cp.async into
// a per-warp ring of shared-memory stages, stages - 1 steps ahead of the decode, and the nested scales' code2
// table in shared memory: the loop's only register loads are x's, from L1/L2. (The nested byte's aligned word
// may read up to 3 bytes past absmax's end: inside the allocation's 256-byte granule, never a fault.)
template <bool BF16, int NT, int RT, bool NESTED, bool SCALE_AFTER, int DECODE>
__global__ void __launch_bounds__(kAsyncMaxWarps<RT> * 32, 1) decode_async_kernel(const Params p) {
  constexpr bool EXACT = DECODE == kExact, SMEM = DECODE == kShared || EXACT;
  static_assert(!(EXACT && SCALE_AFTER), "the exact decode scales each element before rounding it");
  static_assert(DECODE != kLoadsOnly, "no loads-only variant");
  constexpr int DS = 4;  // AsyncLayout::stages
  constexpr int kCtaRows = kRows * RT;
  using T = typename Elem<BF16>::T;
  extern __shared__ __align__(16) uint32_t smem[];
  const lk_decode_args& a = p.a;
  const int K = a.k, M = a.m;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * kCtaRows;
  constexpr AsyncLayout L(DECODE, NESTED, RT);
  static_assert(L.stages == DS, "the layout's ring and the loop's wait depth must agree");
  const uint32_t sbase = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t code2_s = sbase + L.table;
  const uint32_t ring = sbase + L.table + L.code2 + warp * L.per_warp;
  // This lane's W and scale places in slot 0 (opaque: otherwise rebuilt from the thread index at every step)
  const uint32_t wslot = opaque(ring + 16 * lane), sslot = opaque(ring + L.w + 4 * lane);
  constexpr uint32_t stage = L.stage;
  const int src_a = (int)opaque((lane & ~3) | (t & 2)), src_b = src_a | 1;
  const int stride = (int)opaque(nwarps * kStep);
  const int wstep = stride >> 1;
  const int kb0 = warp * kStep;
  const int nfull = K - kb0 >= kStep ? (K - kb0 - kStep) / stride + 1 : 0;
  // K % 128 == 64: one warp has a last 64-wide step (TAIL), where lanes t = 2, 3 are past
  // the row's end: they copy zeros (W; x stays zeros) and fetch an in-range scale they do not use.
  const bool tail = kb0 + nfull * stride < K;
  using Full = std::false_type;
  using Tail = std::true_type;
  uint32_t fs[RT];  // flat index of the element whose block scale this lane copies, at the next issued step
  const uint8_t* pa[RT];
  const uint8_t* pb[RT];
  w_start<RT>(a, row0, kb0, g, t, fs, pa, pb);
  uint32_t fr[RT];  // the same index at the step being decoded (the nested byte's place in its word)
#pragma unroll
  for (int rt = 0; rt < RT; ++rt) fr[rt] = fs[rt];
  // x: lane (g, t) of token tile nt reads token min(g + 8 nt, M - 1): the columns of tokens >= M come from a
  // real token's x and are never stored.
  const T* xp[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
    xp[nt] = static_cast<const T*>(a.x) + (int64_t)min(g + 8 * nt, M - 1) * a.x_row + kb0 + 32 * t;
  auto issue = [&](int slot, auto tail_step) {  // the next step's copies into ring slot `slot`
    constexpr bool TAIL = decltype(tail_step)::value;
    const uint32_t w = wslot + slot * stage, sc = sslot + slot * stage;
    const bool live = !TAIL || t < 2;
    const uint32_t bytes = live ? 16u : 0u;
    const int back = live ? 0 : 32;  // a dead lane's source: its live partner's, in range (nothing is read)
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
      cp_async16(w + rt * 1024, pa[rt] - back, bytes);
      cp_async16(w + rt * 1024 + 512, pb[rt] - back, bytes);
      const uint32_t f = fs[rt] - (TAIL ? 32u * (t & 2) : 0u), b = f >> p.log2_bs;
      if (NESTED) {
        cp_async4(sc + rt * 128, static_cast<const uint8_t*>(a.absmax) + (b & ~3u));
        cp_async4(sc + (RT + rt) * 128, a.absmax2 + (b >> p.log2_bs2));
      } else {
        cp_async4(sc + rt * 128, static_cast<const float*>(a.absmax) + b);
      }
      pa[rt] += wstep, pb[rt] += wstep, fs[rt] += stride;
    }
  };
  // The first stages' copies go out before the tables are built, so their latency overlaps it.
  // One commit group per step, empty past the last full one: wait_group<DS - 2> then means "step j landed".
  // The tail step (rare: K % 128 == 64) is copied after the loop, so the loop's code is the full steps only.
  // The LoRA operands' copies (below) join the last prologue group, done before the epilogue needs them.
#pragma unroll
  for (int d = 0; d < DS - 2; ++d) {
    if (d < nfull) issue(d, Full());
    cp_async_commit();
  }
  if (DS - 2 < nfull) issue(DS - 2, Full());
  // LoRA operands: [b rows of this CTA][r] then [xa tokens][r], 16-bit, in the last prologue group; every
  // thread's wait_group 0 and the barrier before the reduction make them visible to the epilogue's threads
  const bool lora_s = lora_smem_bytes(a, kCtaRows) > 0;
  const uint32_t bias_at = sbase + L.rings_end(nwarps), lora_at = bias_at + 4 * kCtaRows;
  if (lora_s) {
    const int words = a.r >> 1, rows = kCtaRows + M;
    for (int i = threadIdx.x; i < rows * words; i += blockDim.x) {
      const int row = i / words, wd = i - row * words;
      const T* src = row < kCtaRows ? static_cast<const T*>(a.b) + (int64_t)min(row0 + row, a.n - 1) * a.b_row
                                    : static_cast<const T*>(a.xa) + (int64_t)(row - kCtaRows) * a.xa_row;
      cp_async4(lora_at + 4 * i, src + 2 * wd);
    }
  }
  cp_async_commit();
  // The CTA's bias, loaded now (while the tables are built) into shared memory: a register held through the
  // loop was spilled on sm_80. The barriers before the epilogue make it visible.
  if (a.bias && threadIdx.x < kCtaRows)
    smem[(bias_at - sbase) / 4 + threadIdx.x] = __float_as_uint(
        Elem<BF16>::load(a.bias, (int64_t)min(row0 + (int)threadIdx.x, a.n - 1) * a.bias_stride));
  const Decoder<BF16, DECODE> decode = make_decoder<BF16, DECODE>(a.code, smem, p.base3210, lane);
  // code2 and the offset; read from shared memory at each step (a register would be spilled: ptxas kept the
  // offset on the stack and reloaded it every step)
  if (NESTED)
    for (int i = threadIdx.x; i < 257; i += blockDim.x)
      smem[L.table / 4 + i] = __float_as_uint(__ldg(i < 256 ? a.code2 + i : a.offset));
  if (SMEM || NESTED) __syncthreads();

  float acc[RT][NT][4];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) acc[rt][nt][0] = acc[rt][nt][1] = acc[rt][nt][2] = acc[rt][nt][3] = 0.f;
  auto step = [&](int slot, auto tail_step) {
    constexpr bool TAIL = decltype(tail_step)::value;
    const uint32_t w = wslot + slot * stage, sc = sslot + slot * stage;
    // x first: its L1/L2 latency overlaps the scale and the first decodes. Lanes past the row's end keep
    // zeros, as W there is zeros and x * 0 must not make a NaN.
    const bool live = !TAIL || t < 2;
    uint32_t xr[NT][16];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const uint4* v = reinterpret_cast<const uint4*>(xp[nt]);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const uint4 u = live ? __ldg(v + q) : make_uint4(0, 0, 0, 0);
        xr[nt][4 * q] = u.x, xr[nt][4 * q + 1] = u.y, xr[nt][4 * q + 2] = u.z, xr[nt][4 * q + 3] = u.w;
      }
      xp[nt] += stride;
    }
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
      const uint4 wa = lds128(w + rt * 1024), wb = lds128(w + rt * 1024 + 512);
      const uint32_t raw = lds(sc + rt * 128);
      float s;
      if (NESTED) {
        const uint32_t f = fr[rt] - (TAIL ? 32u * (t & 2) : 0u);
        const uint32_t byte = (raw >> (8 * ((f >> p.log2_bs) & 3u))) & 0xffu;
        // bitsandbytes' order and roundings, as lk::block_scale (host-tested) computes them
        s = lk::add_rn(lk::mul_rn(ldsf(code2_s + 4 * byte), ldsf(sc + (RT + rt) * 128)), ldsf(code2_s + 1024));
      } else {
        s = __uint_as_float(raw);
      }
      fr[rt] += stride;
      const uint32_t s2 = SCALE_AFTER || EXACT ? __float_as_uint(s) : pack_scale<BF16>(s);
      const uint32_t sa = __shfl_sync(0xffffffffu, s2, src_a), sb = __shfl_sync(0xffffffffu, s2, src_b);
      mma_step<BF16, NT, SCALE_AFTER, EXACT>(decode, wa, wb, sa, sb, xr, acc[rt]);
    }
  };

  // Step j: wait for its group (all but the newest DS - 2), copy step j + DS - 1 into the slot step j - 1 used,
  // decode step j. Each lane reads only what it copied, so no warp sync is needed.
  for (int j0 = 0; j0 < nfull; j0 += DS) {
#pragma unroll
    for (int u = 0; u < DS; ++u) {
      const int j = j0 + u;
      if (j >= nfull) break;
      cp_async_wait<DS - 2>();
      if (j + DS - 1 < nfull) issue((u + DS - 1) % DS, Full());
      cp_async_commit();
      step(u, Full());
    }
  }
  if (tail) {
    cp_async_wait<0>();  // the slots are free: step nfull's copies go to slot 0, unpipelined
    issue(0, Tail());
    cp_async_commit();
    cp_async_wait<0>();
    step(0, Tail());
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the table and its ring before they hold partial sums
  const T* lora = reinterpret_cast<const T*>(reinterpret_cast<const char*>(smem) + (lora_at - sbase));
  reduce_partials<RT, NT>(smem, acc, a, row0, [&](int tok, int n, int row, float sum) {
    const float bias = a.bias ? ldsf(bias_at + 4 * row) : 0.f;
    if (lora_s)
      finish<BF16>(a, tok, n, sum, lora + (kCtaRows + tok) * a.r, 1, lora + row * a.r, 1, bias);
    else
      finish<BF16>(a, tok, n, sum, static_cast<const T*>(a.xa) + tok * a.xa_row, a.xa_col,
                   static_cast<const T*>(a.b) + n * a.b_row, a.b_col, bias);
  });
}

// One warp per row, any K: each weight element decoded exactly as bitsandbytes (fp32 product,
// one rounding), then fp32 FMAs with up to 16 tokens.
template <bool BF16>
__global__ void __launch_bounds__(kGenericWarps * 32) decode_generic_kernel(const Params p) {
  using E = Elem<BF16>;
  const lk_decode_args& a = p.a;
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * kGenericWarps + (threadIdx.x >> 5);
  if (n >= a.n) return;
  const float offset = a.nested ? __ldg(a.offset) : 0.f;
  float acc[16];
#pragma unroll
  for (int m = 0; m < 16; ++m) acc[m] = 0.f;
  const uint32_t base = (uint32_t)n * (uint32_t)a.k;
  for (int k = lane; k < a.k; k += 32) {
    const uint32_t i = base + k;
    const float s = lk::block_scale(a.absmax, a.nested, a.code2, a.absmax2, (uint32_t)a.blocksize2, offset,
                                    i / (uint32_t)a.blocksize);
    const uint16_t wbits = lk::decode_exact_bits<BF16>(a.code, lk::nibble_at(a.packed, i), s);
    const float w = lk::bits_to_f32<BF16>(wbits);
#pragma unroll
    for (int m = 0; m < 16; ++m)
      if (m < a.m) acc[m] = fmaf(w, E::load(a.x, m * a.x_row + k), acc[m]);
  }
#pragma unroll
  for (int m = 0; m < 16; ++m) {
    float v = acc[m];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (m < a.m && lane == m) epilogue<BF16>(a, m, n, v);
  }
}

int ilog2_exact(int v) {  // log2 of a power of two, else -1
  if (v <= 0 || (v & (v - 1))) return -1;
  int l = 0;
  while ((1 << l) < v) ++l;
  return l;
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

using KernelFn = void (*)(Params);

template <bool BF16, int NT, int RT, int DECODE, int DEPTH>
KernelFn pick_fast(bool nested, bool after) {
  if constexpr (DECODE == kExact)  // always scales before rounding
    return nested ? decode_fast_kernel<BF16, NT, RT, true, false, kExact, DEPTH>
                  : decode_fast_kernel<BF16, NT, RT, false, false, kExact, DEPTH>;
  else if (nested)
    return after ? decode_fast_kernel<BF16, NT, RT, true, true, DECODE, DEPTH>
                 : decode_fast_kernel<BF16, NT, RT, true, false, DECODE, DEPTH>;
  else
    return after ? decode_fast_kernel<BF16, NT, RT, false, true, DECODE, DEPTH>
                 : decode_fast_kernel<BF16, NT, RT, false, false, DECODE, DEPTH>;
}

template <bool BF16, int NT, int RT, int DEPTH>
KernelFn pick_fast(int decode, bool nested, bool after) {
  if constexpr (NT == 1 && RT == 1 && DEPTH == 0)
    if (decode == kLoadsOnly) return pick_fast<BF16, NT, RT, kLoadsOnly, DEPTH>(nested, after);
  if (decode == kRegisters) return pick_fast<BF16, NT, RT, kRegisters, DEPTH>(nested, after);
  if (decode == kExact) return pick_fast<BF16, NT, RT, kExact, DEPTH>(nested, after);
  return pick_fast<BF16, NT, RT, kShared, DEPTH>(nested, after);
}

template <bool BF16, int NT, int RT, int DECODE>
KernelFn pick_async(bool nested, bool after) {
  if constexpr (DECODE == kExact)
    return nested ? decode_async_kernel<BF16, NT, RT, true, false, kExact> : decode_async_kernel<BF16, NT, RT, false, false, kExact>;
  else if (nested)
    return after ? decode_async_kernel<BF16, NT, RT, true, true, DECODE> : decode_async_kernel<BF16, NT, RT, true, false, DECODE>;
  else
    return after ? decode_async_kernel<BF16, NT, RT, false, true, DECODE> : decode_async_kernel<BF16, NT, RT, false, false, DECODE>;
}

template <bool BF16, int NT, int RT>
KernelFn pick_async(int decode, bool nested, bool after) {
  if (decode == kRegisters) return pick_async<BF16, NT, RT, kRegisters>(nested, after);
  if (decode == kExact) return pick_async<BF16, NT, RT, kExact>(nested, after);
  return pick_async<BF16, NT, RT, kShared>(nested, after);
}

// The fast kernel and its launch shape for these arguments: pipeline 0 the register ring (decode_fast_kernel),
// 1 the cp.async stages (decode_async_kernel) with `smem` bytes of dynamic shared memory.
struct FastLaunch {
  KernelFn kernel;  // null when no async launch fits: `error` says why
  int tiles, warps, pipeline, smem;
  cudaError_t error = cudaSuccess;
};

// Per device: the dynamic shared memory a CTA may opt in to, and SMs.
struct DeviceLimits {
  int sms = 0, smem_optin = 0;
};
DeviceLimits query_limits(int device) {
  DeviceLimits d;
  d.sms = 132, d.smem_optin = 48 * 1024;
  cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device);
  cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  return d;
}
DeviceLimits device_limits(int device) {
  constexpr int kCached = 64;
  static DeviceLimits cache[kCached];
  static std::once_flag once[kCached];
  if (device < 0 || device >= kCached) return query_limits(device);
  std::call_once(once[device], [device] { cache[device] = query_limits(device); });
  return cache[device];
}

// The async kernel copies the nested scales' byte as the aligned 4-byte word holding it.
bool async_applies(const lk_decode_args& a) {
  return !a.nested || (reinterpret_cast<uintptr_t>(a.absmax) & 3u) == 0;
}

// Above 48 KB a kernel must opt in to its dynamic shared memory, once per kernel and device.
bool allow_smem(KernelFn k, int device, int bytes) {
  if (bytes <= 48 * 1024) return true;
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;
  const std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(reinterpret_cast<const void*>(k), device);
  if (done.count(key)) return true;
  if (cudaFuncSetAttribute(reinterpret_cast<const void*>(k), cudaFuncAttributeMaxDynamicSharedMemorySize,
                           device_limits(device).smem_optin) != cudaSuccess)
    return false;
  done.insert(key);
  return true;
}

// CTAs of kernel k resident per SM at this many warps and bytes of dynamic shared memory (CUDA's occupancy
// calculator, which counts registers too), cached: the async launcher weighs several launches per shape. On a
// failed query, 0 with the error in *error, cleared from CUDA's state so that it does not outlive the launch.
int resident_ctas(KernelFn k, int device, int warps, int smem, cudaError_t* error) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int, int>, int> done;
  const auto key = std::make_tuple(reinterpret_cast<const void*>(k), device, warps, smem);
  {
    const std::lock_guard<std::mutex> lock(mu);
    const auto it = done.find(key);
    if (it != done.end()) return it->second;
  }
  int n = 0;
  if (!allow_smem(k, device, smem) ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, k, warps * 32, smem) != cudaSuccess) {
    *error = cudaGetLastError();
    return 0;
  }
  const std::lock_guard<std::mutex> lock(mu);
  done[key] = n;
  return n;
}

// The async kernel's launch: 16- or 32-row CTAs (32 share the decode table and x, at most 8 warps), 1..16 warps
// (split-K inside the CTA, never more than K's steps). Best: every CTA resident in one wave; then at least 8
// warps per SM; then 32-row CTAs at M > 8 (half the x traffic from L2), 16-row ones at M <= 8; then the most
// warps per SM up to 16; then fewer warps per CTA. Fixed row tiles or warps (measurement) narrow the choice.
template <bool BF16>
FastLaunch plan_async(const lk_decode_args& a, const DeviceLimits& dev, bool after) {
  const int steps = (a.k + kStep - 1) / kStep, prefer_rt = a.m > 8 ? 2 : 1;
  FastLaunch best{nullptr, 0, 0, 1, 0};
  cudaError_t first_error = cudaSuccess;
  long best_score = -1;
  for (int rt = 1; rt <= 2; ++rt) {
    if (a.row_tiles && rt != a.row_tiles) continue;
    const KernelFn k = rt == 2 ? (a.m > 8 ? pick_async<BF16, 2, 2>(a.decode, a.nested, after)
                                          : pick_async<BF16, 1, 2>(a.decode, a.nested, after))
                               : (a.m > 8 ? pick_async<BF16, 2, 1>(a.decode, a.nested, after)
                                          : pick_async<BF16, 1, 1>(a.decode, a.nested, after));
    const AsyncLayout L(a.decode, a.nested, rt);
    const int lora = lora_smem_bytes(a, kRows * rt), tiles = (a.n + rt * kRows - 1) / (rt * kRows);
    const int top = rt == 2 ? kAsyncMaxWarps<2> : kAsyncMaxWarps<1>;
    for (int w = 1; w <= top; w *= 2) {
      if (a.warps ? w != a.warps : (w > 1 && w > steps)) continue;
      const int smem = L.bytes(w, rt, lora);
      if (smem > dev.smem_optin) continue;
      cudaError_t error = cudaSuccess;
      const int resident = resident_ctas(k, a.device, w, smem, &error);
      if (resident < 1) {
        if (first_error == cudaSuccess) first_error = error != cudaSuccess ? error : cudaErrorInvalidConfiguration;
        continue;
      }
      const int per_sm = (tiles + dev.sms - 1) / dev.sms;
      const int warps_per_sm = (resident < per_sm ? resident : per_sm) * w;
      const long score = (resident >= per_sm ? 1L << 20 : 0) + (warps_per_sm >= 8 ? 1L << 19 : 0) +
                         (rt == prefer_rt ? 1L << 18 : 0) + (warps_per_sm < 16 ? warps_per_sm : 16) * 64 + (16 - w);
      if (score > best_score) best_score = score, best = FastLaunch{k, tiles, w, 1, smem};
    }
  }
  if (!best.kernel) best.error = first_error != cudaSuccess ? first_error : cudaErrorInvalidConfiguration;
  return best;
}

template <bool BF16>
FastLaunch plan_fast(const lk_decode_args& a, const DeviceLimits& dev) {
  const bool after = a.blocksize >= kStep && a.k % kStep == 0;
  if (a.pipeline == 1 && async_applies(a)) return plan_async<BF16>(a, dev, after);
  const int sms = dev.sms;
  // M > 8 (two n8 token tiles): two row tiles per warp share each x fragment, which halves the x traffic
  // through L1 (otherwise 4 bytes per packed weight byte, beside the table's 4), when N still gives
  // about one such CTA per SM.
  const int rt = a.m <= 8 ? 1
                 : a.row_tiles     ? a.row_tiles
                 : (a.n + 2 * kRows - 1) / (2 * kRows) >= (3 * sms) / 4 ? 2
                                                                         : 1;
  const int tiles = (a.n + rt * kRows - 1) / (rt * kRows);
  const int steps = (a.k + kStep - 1) / kStep;
  // Warps per CTA (split-K inside the CTA): the most that keeps every CTA resident in one wave at
  // about 16 warps per SM (enough 16-byte loads in flight for HBM), never more than K's 128-wide steps.
  int warps = 1;
  while (warps < kMaxWarps && warps * 2 * tiles <= 16 * sms && warps * 2 <= steps) warps *= 2;
  if (a.warps) warps = a.warps;  // fixed by the caller (measurement)
  KernelFn k;
  if (rt == 2)
    k = pick_fast<BF16, 2, 2, 0>(a.decode, a.nested, after);
  else if (a.m > 8)
    k = pick_fast<BF16, 2, 1, 0>(a.decode, a.nested, after);
  else if (a.depth == 1)
    k = pick_fast<BF16, 1, 1, 1>(a.decode, a.nested, after);
  else if (a.depth == 2)
    k = pick_fast<BF16, 1, 1, 2>(a.decode, a.nested, after);
  else
    k = pick_fast<BF16, 1, 1, 0>(a.decode, a.nested, after);
  return FastLaunch{k, tiles, warps, 0, 0};
}

// Launches the kernel for `path`; the launch's error, or cudaErrorInvalidConfiguration when no async launch fits
// (every occupancy query failed).
template <bool BF16>
cudaError_t launch(const Params& p, int path, cudaStream_t stream) {
  const lk_decode_args& a = p.a;
  if (path == 0) {
    const int grid = (a.n + kGenericWarps - 1) / kGenericWarps;
    decode_generic_kernel<BF16><<<grid, kGenericWarps * 32, 0, stream>>>(p);
    return cudaGetLastError();
  }
  const FastLaunch f = plan_fast<BF16>(a, device_limits(a.device));
  if (!f.kernel) return f.error;
  if (!allow_smem(f.kernel, a.device, f.smem)) return cudaGetLastError();
  f.kernel<<<f.tiles, f.warps * 32, f.smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

thread_local cudaError_t g_last_error = cudaSuccess;

namespace {

// This library links its own (static) runtime: make the tensors' device current for a call, and put the
// caller's back when the scope ends. `ok` is false (and g_last_error says why) when the switch failed.
struct DeviceScope {
  int previous = -1, device;
  bool ok;
  explicit DeviceScope(int d) : device(d) {
    ok = (g_last_error = cudaGetDevice(&previous)) == cudaSuccess &&
         (previous == d || (g_last_error = cudaSetDevice(d)) == cudaSuccess);
  }
  ~DeviceScope() {
    if (ok && previous != device) cudaSetDevice(previous);
  }
};

}  // namespace

extern "C" {

int lk_abi_version(void) { return LK_CSRC_ABI_VERSION; }

int lk_args_size(void) { return (int)sizeof(lk_decode_args); }

const char* lk_status_string(int status) {
  switch (status) {
    case LK_OK:
      return "ok";
    case LK_BAD_ARGUMENT:
      return "bad argument (sizes, strides, pointers or flags the kernel cannot take)";
    case LK_CUDA_ERROR:
      return "CUDA launch failed";
    default:
      return "unknown status";
  }
}

int lk_decode_path(const lk_decode_args* a) {
  if (!a) return -1;
  if (a->m < 1 || a->m > 16 || a->n < 1 || a->k < 1 || a->r < 0 || a->device < 0) return -1;
  if ((int64_t)a->n * a->k >= ((int64_t)1 << 31)) return -1;
  if (!a->x || !a->packed || !a->code || !a->absmax || !a->out) return -1;
  if (a->dtype != LK_BF16 && a->dtype != LK_F16) return -1;
  if (a->blocksize < 1) return -1;
  if (a->nested && (!a->code2 || !a->absmax2 || !a->offset || a->blocksize2 < 1)) return -1;
  if (a->r > 0 && (!a->xa || !a->b)) return -1;
  if (a->row_tiles < 0 || a->row_tiles > 2) return -1;
  if (a->decode < kShared || a->decode > kLoadsOnly) return -1;
  if (a->decode == kLoadsOnly && (a->m > 8 || a->depth != 0 || a->force_generic)) return -1;
  if (a->warps < 0 || a->warps > kMaxWarps || (a->warps & (a->warps - 1))) return -1;
  if (a->depth != 0 && a->depth != 1 && a->depth != 2 && a->depth != 4) return -1;
  if (a->pipeline != 0 && a->pipeline != 1) return -1;
  // measurements of the register ring only
  if (a->pipeline == 1 && (a->depth != 0 || a->decode == kLoadsOnly)) return -1;
  // two row tiles (forced, or possible at M > 8) take at most 8 warps in the async kernel
  if (a->pipeline == 1 && a->warps > kAsyncMaxWarps<2> && (a->row_tiles == 2 || (a->m > 8 && a->row_tiles == 0)))
    return -1;
  if (a->force_generic) return 0;
  // The fast kernel's steps pair lanes over 64 elements of one block: K % 64 == 0, blocksize >= 64.
  const bool fast = a->k % 64 == 0 && ilog2_exact(a->blocksize) >= 6 &&
                    (!a->nested || ilog2_exact(a->blocksize2) >= 0) && aligned16(a->packed) && aligned16(a->x) &&
                    a->x_row % 8 == 0;
  return fast ? 1 : 0;
}

int lk_linear_decode_fwd(const lk_decode_args* args, void* stream) {
  const int path = lk_decode_path(args);
  if (path < 0) return LK_BAD_ARGUMENT;
  Params p;
  p.a = *args;
  p.log2_bs = ilog2_exact(args->blocksize);
  p.log2_bs2 = args->nested ? ilog2_exact(args->blocksize2) : 0;
  p.base3210 = 0x32103210u;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const DeviceScope scope(args->device);
  if (!scope.ok) return LK_CUDA_ERROR;
  g_last_error = args->dtype == LK_BF16 ? launch<true>(p, path, s) : launch<false>(p, path, s);
  return g_last_error == cudaSuccess ? LK_OK : LK_CUDA_ERROR;
}

const char* lk_last_cuda_error(void) { return cudaGetErrorString(g_last_error); }

int lk_fast_launch(const lk_decode_args* args, int* out) {
  const int path = lk_decode_path(args);
  if (path < 0) return LK_BAD_ARGUMENT;
  if (path == 0) {
    out[0] = out[1] = out[2] = out[3] = out[4] = out[5] = 0;
    return LK_OK;
  }
  const DeviceScope scope(args->device);
  if (!scope.ok) return LK_CUDA_ERROR;
  const DeviceLimits dev = device_limits(args->device);
  const FastLaunch f = args->dtype == LK_BF16 ? plan_fast<true>(*args, dev) : plan_fast<false>(*args, dev);
  int resident = 0;
  if (!f.kernel || !allow_smem(f.kernel, args->device, f.smem)) {
    g_last_error = f.kernel ? cudaGetLastError() : f.error;
    return LK_CUDA_ERROR;
  }
  g_last_error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, f.kernel, f.warps * 32, f.smem);
  out[0] = f.tiles, out[1] = f.warps, out[2] = resident, out[3] = dev.sms, out[4] = f.pipeline, out[5] = f.smem;
  return g_last_error == cudaSuccess ? LK_OK : LK_CUDA_ERROR;
}

}  // extern "C"
