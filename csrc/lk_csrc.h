// C ABI of lora_kernels/_csrc*.so, loaded with ctypes by lora_kernels/csrc.py.
// Plain C types only, so the library does not depend on how the installed torch was built.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LK_CSRC_ABI_VERSION 3
#define LK_API __attribute__((visibility("default")))  // the build hides everything else

enum lk_status {
  LK_OK = 0,
  LK_BAD_ARGUMENT = 1,  // a size, stride, pointer or flag the kernels cannot take
  LK_CUDA_ERROR = 2,    // the launch failed (cudaGetLastError after it)
};

enum lk_dtype { LK_BF16 = 0, LK_F16 = 1 };

// y[m, n] = x[m, :] . decode(W)[n, :] + scaling * xa[m, :] . b[n, :] + bias[n], for m < M <= 16.
// Strides are in elements. x's inner stride must be 1; the others are free. xa/b/bias may be NULL
// (r = 0 / no bias). All 16-bit tensors share `dtype`; code/absmax2/offset are fp32; absmax is
// fp32, or uint8 when nested. Every pointer is device memory; nothing is read on the host.
typedef struct lk_decode_args {
  const void* x;
  int64_t x_row;
  const uint8_t* packed;  // (N*K+1)/2 bytes, bitsandbytes layout
  const float* code;      // 16 entries
  const void* absmax;     // ceil(N*K / blocksize) entries
  const float* code2;     // nested: 256 entries
  const float* absmax2;   // nested: ceil(blocks / blocksize2) entries
  const float* offset;    // nested: one fp32, on the device
  const void* xa;
  int64_t xa_row, xa_col;
  const void* b;
  int64_t b_row, b_col;
  const void* bias;
  int64_t bias_stride;
  void* out;
  int64_t out_row;
  int32_t m, n, k, r;
  int32_t blocksize, blocksize2;
  int32_t nested;
  int32_t dtype;  // enum lk_dtype
  float scaling;
  int32_t force_generic;  // 1: the element-wise kernel even where the fast one applies (tests)
  int32_t device;         // CUDA device index of every tensor (made current before the launch)
  int32_t decode;     // fast kernel's decode: 0 a 256-entry byte -> code-pair table in shared memory,
                      // 1 PRMT over a 16-entry register table (both round the codes to the dtype
                      // first), 2 exact: fp32 code * fp32 scale rounded once per element, as bitsandbytes;
                      // 3 measurement only (M <= 8): the loads without decode or MMA, a meaningless output
  int32_t row_tiles;  // 16-row tiles per warp in the fast kernel: 0 auto, 1, or 2 (the ring: M > 8 only;
                      // the async pipeline at any M, with at most 8 warps)
  int32_t warps;      // warps per CTA in the fast kernel: 0 auto, else a power of two up to 16
  int32_t depth;      // steps of W loaded ahead in the M <= 8 kernel (measurement): 0 auto (4), 1, 2 or 4
  int32_t pipeline;   // fast kernel's loads: 0 a register ring (measured on the H200), 1 cp.async stages in
                      // shared memory (not yet run on a GPU); a nested absmax not 4-byte aligned takes 0
} lk_decode_args;

LK_API int lk_abi_version(void);
LK_API int lk_args_size(void);  // sizeof(lk_decode_args): the loader checks its ctypes mirror against it
LK_API const char* lk_status_string(int status);
LK_API const char* lk_last_cuda_error(void);  // this thread's last CUDA error in the library
// Launches on `stream` (a cudaStream_t); no host sync, no allocation: CUDA-graph capturable.
LK_API int lk_linear_decode_fwd(const lk_decode_args* args, void* stream);
// Which kernel lk_linear_decode_fwd would launch for these args: 1 fast, 0 generic, <0 bad args.
LK_API int lk_decode_path(const lk_decode_args* args);
// The fast kernel's launch for these args (for measurement): out[0] CTAs, out[1] warps per CTA, out[2] CTAs
// resident per SM (cudaOccupancyMaxActiveBlocksPerMultiprocessor), out[3] SMs, out[4] the pipeline taken,
// out[5] dynamic shared memory bytes; zeros for the generic kernel. `out` holds 6 ints.
LK_API int lk_fast_launch(const lk_decode_args* args, int* out);

#ifdef __cplusplus
}
#endif
