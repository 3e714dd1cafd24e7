// Interface between the torch-facing host code (ops.cpp) and the kernels (*.cu).
//
// The .cu files include no torch header: they take raw pointers and a dtype tag and return a
// cudaError_t. This keeps nvcc away from ATen's headers (which it would parse once per GPU
// arch), so the extension builds in a fraction of the time. Plain C++, no CUDA syntax.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace leapalign {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------- leap_connect

// Blocks per sample of the forward; depends on the per-sample size only, so dist is bitwise
// reproducible on every GPU. The float64 partials buffer holds B * this many values.
inline int64_t leap_connect_blocks_per_sample(int64_t n_per_sample) {
  constexpr int64_t kElemsPerBlock = 256 * 8 * 4;  // threads x vector width x vectors/thread
  constexpr int64_t kMax = 1024;
  const int64_t b = ceil_div(n_per_sample, kElemsPerBlock);
  return b < 1 ? 1 : (b > kMax ? kMax : b);
}

// out = x_real; dist[b] = mean_i |x_real - (x_start - c*v)| over sample b's N elements.
// xs/xr/out are `lat`, v is `vel`; all contiguous (B, N). partial: B * blocks_per_sample(N).
cudaError_t leap_connect_fwd_launch(DType lat, DType vel, const void* xs, const void* v,
                                    const void* xr, void* out, double* partial, double* dist,
                                    float c, int64_t B, int64_t N, cudaStream_t stream);

// gx = g, gv = negc * g, n contiguous elements of dtype t.
cudaError_t leap_connect_bwd_launch(DType t, const void* g, void* gx, void* gv, float negc,
                                    int64_t n, cudaStream_t stream);

// ---------------------------------------------------------------- mod_layernorm

constexpr size_t kStaticSmemSlack = 1024;  // room for the kernels' static shared memory

inline size_t mod_layernorm_fwd_smem(int64_t D) { return static_cast<size_t>(D) * sizeof(float); }
inline size_t mod_layernorm_bwd_smem(int64_t D) { return 3 * static_cast<size_t>(D) * sizeof(float); }

// Row chunks per sample for the backward: enough blocks (B * chunks) to fill the GPU a few
// times over, few enough that the fp32 partials (chunks * D * 8 bytes per sample) stay small
// next to the (B, M, D) tensors. Every chunk holds ceil(M / chunks) rows, the last one fewer.
inline int64_t mod_layernorm_bwd_chunks(int64_t B, int64_t M, int num_sms) {
  if (B <= 0 || M <= 0) return 0;
  const int64_t target_blocks = 4 * static_cast<int64_t>(num_sms > 0 ? num_sms : 1);
  int64_t chunks = ceil_div(target_blocks, B);
  chunks = chunks < 1 ? 1 : (chunks > M ? M : chunks);
  return ceil_div(M, ceil_div(M, chunks));  // no empty chunk
}

// y = LayerNorm(x) * (1 + scale[b]) + shift[b] for rows = B*M rows of D; mean/rstd per row.
cudaError_t mod_layernorm_fwd_launch(DType t, const void* x, const void* scale, const void* shift,
                                     void* y, float* mean, float* rstd, int64_t rows, int64_t M,
                                     int D, float eps, cudaStream_t stream);

// g_x per row; g_scale / g_shift (B, D) through fp32 partials `part` (2 * B * chunks * D floats).
cudaError_t mod_layernorm_bwd_launch(DType t, const void* gy, const void* x, const void* scale,
                                     const float* mean, const float* rstd, void* gx, void* g_scale,
                                     void* g_shift, float* part, int64_t B, int64_t M, int D,
                                     int64_t chunks, cudaStream_t stream);

}  // namespace leapalign
