// mod_layernorm kernels: y = LayerNorm(x, no affine) * (1 + scale[b]) + shift[b], x (B, M, D).
//
// Forward: one row per block; the row is read once into shared memory as fp32, then mean and
// variance are two exact passes over shared memory (no E[x^2]-E[x]^2 cancellation), then y is
// written. Any D works (16-byte loads when D allows), up to the device's shared memory.
//
// Backward: a block owns a chunk of rows of one sample. Every thread owns a fixed set of
// columns, so the column sums for g_scale / g_shift are accumulated in shared memory without
// atomics, in row order; each block writes its fp32 partials and a second kernel sums them
// over the chunks in a fixed order. Bitwise reproducible on a given GPU model (the number of
// chunks follows the SM count, launch.h).
#include "common.cuh"

namespace leapalign {
namespace {

constexpr int kMaxThreads = 512;
constexpr size_t kDefaultSmem = 48 * 1024;
constexpr int kReduceX = 32;  // column-reduction block: 32 columns x 8 chunk lanes
constexpr int kReduceY = 8;

int threads_for(int nvec) {
  const int t = static_cast<int>(ceil_div(nvec, 32) * 32);
  return t < 32 ? 32 : (t > kMaxThreads ? kMaxThreads : t);
}

// Opts `kernel` in to `bytes` of dynamic shared memory when above the 48 KiB default.
template <typename K>
cudaError_t reserve_smem(K kernel, size_t bytes) {
  if (bytes + kStaticSmemSlack <= kDefaultSmem) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    mod_ln_fwd_kernel(const T* __restrict__ x, const T* __restrict__ scale,
                      const T* __restrict__ shift, T* __restrict__ y, float* __restrict__ mean,
                      float* __restrict__ rstd, int64_t M, int D, float eps) {
  extern __shared__ float row[];  // D floats; element (i, j) of vector i at j * nvec + i
  __shared__ float red[32];
  const int64_t r = blockIdx.x;
  const int64_t b = r / M;
  const int nvec = D / VEC;
  const T* xr = x + r * D;

  float s = 0.f;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    const Vec<T, VEC> xv = load_vec<T, VEC>(xr, i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float f = to_f(xv.v[j]);
      row[j * nvec + i] = f;  // read back only by this thread: no barrier needed
      s += f;
    }
  }
  const float mu = block_sum(s, red) / static_cast<float>(D);

  float q = 0.f;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float d = row[j * nvec + i] - mu;
      q += d * d;
    }
  }
  const float var = block_sum(q, red) / static_cast<float>(D);
  const float rs = rsqrtf(var + eps);

  const T* sc = scale + b * D;
  const T* sh = shift + b * D;
  T* yr = y + r * D;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    const Vec<T, VEC> sv = load_vec<T, VEC>(sc, i);
    const Vec<T, VEC> hv = load_vec<T, VEC>(sh, i);
    Vec<T, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float xh = (row[j * nvec + i] - mu) * rs;
      o.v[j] = from_f<T>(xh * (1.f + to_f(sv.v[j])) + to_f(hv.v[j]));
    }
    store_vec<T, VEC>(yr, i, o);
  }
  if (threadIdx.x == 0) {
    mean[r] = mu;
    rstd[r] = rs;
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    mod_ln_bwd_kernel(const T* __restrict__ gy, const T* __restrict__ x,
                      const T* __restrict__ scale, const float* __restrict__ mean,
                      const float* __restrict__ rstd, T* __restrict__ gx,
                      float* __restrict__ part_scale, float* __restrict__ part_shift, int64_t M,
                      int D, int64_t rows_per_chunk) {
  // 3 * D floats: (1 + scale[b]), column sums of g*xhat, column sums of g; each laid out with
  // element (i, j) of vector i at j * nvec + i and touched only by the thread owning vector i.
  extern __shared__ float sm[];
  __shared__ float red[64];
  const int nvec = D / VEC;
  const int64_t b = blockIdx.y;
  const int64_t chunk = blockIdx.x;
  const int64_t m0 = chunk * rows_per_chunk;
  const int64_t m1 = m0 + rows_per_chunk < M ? m0 + rows_per_chunk : M;
  float* s1 = sm;
  float* acc_s = sm + D;
  float* acc_h = sm + 2 * D;

  const T* sc = scale + b * D;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    const Vec<T, VEC> sv = load_vec<T, VEC>(sc, i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      s1[j * nvec + i] = 1.f + to_f(sv.v[j]);
      acc_s[j * nvec + i] = 0.f;
      acc_h[j * nvec + i] = 0.f;
    }
  }

  const float inv_d = 1.f / static_cast<float>(D);
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t r = b * M + m;
    const float mu = mean[r];
    const float rs = rstd[r];
    const T* xr = x + r * D;
    const T* gr = gy + r * D;
    float a1 = 0.f;  // sum of gxhat
    float a2 = 0.f;  // sum of gxhat * xhat
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
      const Vec<T, VEC> xv = load_vec<T, VEC>(xr, i);
      const Vec<T, VEC> gv = load_vec<T, VEC>(gr, i);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int k = j * nvec + i;
        const float xh = (to_f(xv.v[j]) - mu) * rs;
        const float g = to_f(gv.v[j]);
        const float gxh = g * s1[k];
        a1 += gxh;
        a2 += gxh * xh;
        acc_s[k] += g * xh;
        acc_h[k] += g;
      }
    }
    block_sum2(a1, a2, red);
    const float c_mean = a1 * inv_d;
    const float c_proj = a2 * inv_d;
    T* gxr = gx + r * D;
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
      const Vec<T, VEC> xv = load_vec<T, VEC>(xr, i);  // this thread's own loads: L1 hits
      const Vec<T, VEC> gv = load_vec<T, VEC>(gr, i);
      Vec<T, VEC> o;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int k = j * nvec + i;
        const float xh = (to_f(xv.v[j]) - mu) * rs;
        const float gxh = to_f(gv.v[j]) * s1[k];
        o.v[j] = from_f<T>(rs * (gxh - c_mean - xh * c_proj));
      }
      store_vec<T, VEC>(gxr, i, o);
    }
  }

  const int64_t prow = (b * gridDim.x + chunk) * D;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    Vec<float, VEC> ps, ph;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      ps.v[j] = acc_s[j * nvec + i];
      ph.v[j] = acc_h[j * nvec + i];
    }
    store_vec<float, VEC>(part_scale + prow, i, ps);
    store_vec<float, VEC>(part_shift + prow, i, ph);
  }
}

// g_scale[b, d] = sum_k part_scale[b, k, d] (same for shift), summed in a fixed order.
template <typename T>
__global__ void __launch_bounds__(kReduceX * kReduceY)
    mod_ln_col_reduce_kernel(const float* __restrict__ part_scale,
                             const float* __restrict__ part_shift, T* __restrict__ g_scale,
                             T* __restrict__ g_shift, int64_t chunks, int D) {
  __shared__ float ts[kReduceY][kReduceX + 1];
  __shared__ float th[kReduceY][kReduceX + 1];
  const int64_t b = blockIdx.y;
  const int d = blockIdx.x * kReduceX + threadIdx.x;
  float s = 0.f, h = 0.f;
  if (d < D) {
    for (int64_t k = threadIdx.y; k < chunks; k += kReduceY) {
      const int64_t off = (b * chunks + k) * D + d;
      s += part_scale[off];
      h += part_shift[off];
    }
  }
  ts[threadIdx.y][threadIdx.x] = s;
  th[threadIdx.y][threadIdx.x] = h;
  __syncthreads();
  if (threadIdx.y == 0 && d < D) {
    float ss = 0.f, hh = 0.f;
#pragma unroll
    for (int k = 0; k < kReduceY; ++k) {
      ss += ts[k][threadIdx.x];
      hh += th[k][threadIdx.x];
    }
    g_scale[b * D + d] = from_f<T>(ss);
    g_shift[b * D + d] = from_f<T>(hh);
  }
}

}  // namespace

cudaError_t mod_layernorm_fwd_launch(DType t, const void* x, const void* scale, const void* shift,
                                     void* y, float* mean, float* rstd, int64_t rows, int64_t M,
                                     int D, float eps, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (D <= 0 || M <= 0) return cudaErrorInvalidValue;
  const size_t smem = mod_layernorm_fwd_smem(D);
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kWide = static_cast<int>(16 / sizeof(T));  // 16-byte loads
    const T* x_p = static_cast<const T*>(x);
    const T* sc_p = static_cast<const T*>(scale);
    const T* sh_p = static_cast<const T*>(shift);
    T* y_p = static_cast<T*>(y);
    const bool wide = D % kWide == 0 && aligned_to(x_p, 16) && aligned_to(sc_p, 16) &&
                      aligned_to(sh_p, 16) && aligned_to(y_p, 16);
    auto run = [&](auto kernel, int vec) {
      cudaError_t err = reserve_smem(kernel, smem);
      if (err != cudaSuccess) return err;
      kernel<<<static_cast<unsigned>(rows), threads_for(D / vec), smem, stream>>>(
          x_p, sc_p, sh_p, y_p, mean, rstd, M, D, eps);
      return cudaGetLastError();
    };
    return wide ? run(mod_ln_fwd_kernel<T, kWide>, kWide) : run(mod_ln_fwd_kernel<T, 1>, 1);
  });
}

cudaError_t mod_layernorm_bwd_launch(DType t, const void* gy, const void* x, const void* scale,
                                     const float* mean, const float* rstd, void* gx, void* g_scale,
                                     void* g_shift, float* part, int64_t B, int64_t M, int D,
                                     int64_t chunks, cudaStream_t stream) {
  if (B <= 0 || M <= 0 || D <= 0 || chunks <= 0 || chunks > M) return cudaErrorInvalidValue;
  const int64_t rows_per_chunk = ceil_div(M, chunks);
  if (ceil_div(M, rows_per_chunk) != chunks) return cudaErrorInvalidValue;  // an empty chunk
  const size_t smem = mod_layernorm_bwd_smem(D);
  float* part_scale = part;
  float* part_shift = part + B * chunks * D;
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kWide = static_cast<int>(16 / sizeof(T));
    const T* gy_p = static_cast<const T*>(gy);
    const T* x_p = static_cast<const T*>(x);
    const T* sc_p = static_cast<const T*>(scale);
    T* gx_p = static_cast<T*>(gx);
    // the fp32 partial rows are stored kWide floats at a time
    const bool wide = D % kWide == 0 && aligned_to(gy_p, 16) && aligned_to(x_p, 16) &&
                      aligned_to(sc_p, 16) && aligned_to(gx_p, 16) &&
                      aligned_to(part_scale, sizeof(float) * kWide) &&
                      aligned_to(part_shift, sizeof(float) * kWide);
    const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(B));
    auto run = [&](auto kernel, int vec) {
      cudaError_t err = reserve_smem(kernel, smem);
      if (err != cudaSuccess) return err;
      kernel<<<grid, threads_for(D / vec), smem, stream>>>(gy_p, x_p, sc_p, mean, rstd, gx_p,
                                                          part_scale, part_shift, M, D,
                                                          rows_per_chunk);
      return cudaGetLastError();
    };
    cudaError_t err = wide ? run(mod_ln_bwd_kernel<T, kWide>, kWide) : run(mod_ln_bwd_kernel<T, 1>, 1);
    if (err != cudaSuccess) return err;
    const dim3 rgrid(static_cast<unsigned>(ceil_div(D, kReduceX)), static_cast<unsigned>(B));
    const dim3 rblock(kReduceX, kReduceY);
    mod_ln_col_reduce_kernel<T><<<rgrid, rblock, 0, stream>>>(
        part_scale, part_shift, static_cast<T*>(g_scale), static_cast<T*>(g_shift), chunks, D);
    return cudaGetLastError();
  });
}

}  // namespace leapalign
