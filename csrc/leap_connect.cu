// leap_connect kernels: leap (x_start - c*v), connector value (copy of x_real) and the
// per-sample L1 distance in float64, in one pass over the three tensors; backward scales.
//
// dist is reduced in two deterministic stages: each block writes one float64 partial (its
// threads accumulate in float64, then a fixed-order block reduction); a second kernel sums each
// sample's partials in a fixed order. The grid depends on the shape only (launch.h), so the
// result is bitwise reproducible on any GPU.
#include "common.cuh"

namespace leapalign {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;  // elements per wide load in the vectorised path
constexpr int64_t kMaxBwdBlocks = 8192;

template <typename L, typename V, int VEC>
__global__ void __launch_bounds__(kThreads)
    leap_connect_fwd_kernel(const L* __restrict__ xs, const V* __restrict__ v,
                            const L* __restrict__ xr, L* __restrict__ out,
                            double* __restrict__ partial, float c,
                            int64_t nvec,  // VEC-wide vectors per sample
                            int bps) {     // blocks per sample
  __shared__ double red[32];
  const int64_t b = blockIdx.x / bps;
  const int64_t blk = blockIdx.x % bps;
  const int64_t base = b * nvec;
  double acc = 0.0;
  for (int64_t i = blk * kThreads + threadIdx.x; i < nvec; i += static_cast<int64_t>(bps) * kThreads) {
    const Vec<L, VEC> a = load_vec<L, VEC>(xs, base + i);
    const Vec<V, VEC> d = load_vec<V, VEC>(v, base + i);
    const Vec<L, VEC> r = load_vec<L, VEC>(xr, base + i);
    store_vec<L, VEC>(out, base + i, r);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      // Same roundings as torch's fp32 `x_start - c * v`, then `x_real - xhat` (no FMA).
      const float xhat = __fsub_rn(to_f(a.v[j]), __fmul_rn(c, to_f(d.v[j])));
      acc += static_cast<double>(fabsf(__fsub_rn(to_f(r.v[j]), xhat)));
    }
  }
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

__global__ void __launch_bounds__(kThreads)
    leap_connect_dist_kernel(const double* __restrict__ partial, double* __restrict__ dist,
                             int bps, double n) {
  __shared__ double red[32];
  double s = 0.0;
  const double* p = partial + static_cast<int64_t>(blockIdx.x) * bps;
  for (int i = threadIdx.x; i < bps; i += kThreads) s += p[i];
  s = block_sum(s, red);
  if (threadIdx.x == 0) dist[blockIdx.x] = s / n;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    leap_connect_bwd_kernel(const T* __restrict__ g, T* __restrict__ gx, T* __restrict__ gv,
                            float negc, int64_t n) {
  const int64_t nvec = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  for (int64_t i = first; i < nvec; i += stride) {
    const Vec<T, VEC> a = load_vec<T, VEC>(g, i);
    store_vec<T, VEC>(gx, i, a);
    Vec<T, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = from_f<T>(__fmul_rn(negc, to_f(a.v[j])));
    store_vec<T, VEC>(gv, i, o);
  }
  for (int64_t i = nvec * VEC + first; i < n; i += stride) {  // tail, < VEC elements
    const T a = g[i];
    gx[i] = a;
    gv[i] = from_f<T>(__fmul_rn(negc, to_f(a)));
  }
}

}  // namespace

cudaError_t leap_connect_fwd_launch(DType lat, DType vel, const void* xs, const void* v,
                                    const void* xr, void* out, double* partial, double* dist,
                                    float c, int64_t B, int64_t N, cudaStream_t stream) {
  if (B <= 0 || N <= 0) return cudaErrorInvalidValue;
  const int64_t bps = leap_connect_blocks_per_sample(N);
  const dim3 grid(static_cast<unsigned>(B * bps));
  const cudaError_t err = dispatch(lat, [&](auto l_tag) {
    return dispatch(vel, [&](auto v_tag) {
      using L = decltype(l_tag);
      using V = decltype(v_tag);
      const L* xs_p = static_cast<const L*>(xs);
      const V* v_p = static_cast<const V*>(v);
      const L* xr_p = static_cast<const L*>(xr);
      L* out_p = static_cast<L*>(out);
      const bool vec_ok = N % kVec == 0 && aligned_to(xs_p, sizeof(L) * kVec) &&
                          aligned_to(xr_p, sizeof(L) * kVec) &&
                          aligned_to(out_p, sizeof(L) * kVec) && aligned_to(v_p, sizeof(V) * kVec);
      if (vec_ok) {
        leap_connect_fwd_kernel<L, V, kVec><<<grid, kThreads, 0, stream>>>(
            xs_p, v_p, xr_p, out_p, partial, c, N / kVec, static_cast<int>(bps));
      } else {
        leap_connect_fwd_kernel<L, V, 1><<<grid, kThreads, 0, stream>>>(
            xs_p, v_p, xr_p, out_p, partial, c, N, static_cast<int>(bps));
      }
      return cudaGetLastError();
    });
  });
  if (err != cudaSuccess) return err;
  leap_connect_dist_kernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
      partial, dist, static_cast<int>(bps), static_cast<double>(N));
  return cudaGetLastError();
}

cudaError_t leap_connect_bwd_launch(DType t, const void* g, void* gx, void* gv, float negc,
                                    int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    const T* g_p = static_cast<const T*>(g);
    T* gx_p = static_cast<T*>(gx);
    T* gv_p = static_cast<T*>(gv);
    const bool vec_ok = aligned_to(g_p, sizeof(T) * kVec) && aligned_to(gx_p, sizeof(T) * kVec) &&
                        aligned_to(gv_p, sizeof(T) * kVec);
    const int64_t work = vec_ok ? ceil_div(n, kVec) : n;
    int64_t blocks = ceil_div(work, kThreads);
    blocks = blocks < 1 ? 1 : (blocks > kMaxBwdBlocks ? kMaxBwdBlocks : blocks);
    if (vec_ok) {
      leap_connect_bwd_kernel<T, kVec><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          g_p, gx_p, gv_p, negc, n);
    } else {
      leap_connect_bwd_kernel<T, 1><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          g_p, gx_p, gv_p, negc, n);
    }
    return cudaGetLastError();
  });
}

}  // namespace leapalign
