// torch side of the leapalign CUDA ops: argument checks, allocation, streams, the
// TORCH_LIBRARY schemas + CUDA registrations, and the empty Python module that makes the
// shared object importable (`import kernels._C` runs the static registrations below).
//
// The ops are raw forward/backward kernels without autograd (kernels/leap_connect.py and
// kernels/mod_layernorm.py wrap them in autograd.Functions); their fake (meta) impls live in
// kernels/_csrc.py. Kernels: leap_connect.cu, mod_layernorm.cu (interface: launch.h).
#include <Python.h>

#include <limits>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch.h"

namespace leapalign {
namespace {

bool supported(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

DType tag(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    default:
      TORCH_CHECK(false, "leapalign: unsupported dtype ", t, " (supported: float32, bfloat16, float16)");
  }
}

int device_attr(cudaDeviceAttr attr) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, static_cast<int>(c10::cuda::current_device())));
  return value;
}

void check_smem(const char* name, int64_t D, size_t bytes) {
  const size_t limit = static_cast<size_t>(device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin));
  TORCH_CHECK(bytes + kStaticSmemSlack <= limit, name, ": D = ", D, " needs ", bytes,
              " bytes of shared memory per block, more than this GPU allows (", limit, ")");
}

void check_ln_shapes(const char* name, const at::Tensor& x, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 3, name, ": x must be (B, M, D), got shape ", x.sizes());
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == x.size(0) && scale.size(1) == x.size(2), name,
              ": scale must be (B, D) = (", x.size(0), ", ", x.size(2), "), got shape ",
              scale.sizes());
  TORCH_CHECK(supported(x.scalar_type()), name, ": x must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  TORCH_CHECK(scale.scalar_type() == x.scalar_type(), name, ": scale must have x's dtype, got x ",
              x.scalar_type(), " and scale ", scale.scalar_type());
  TORCH_CHECK(x.size(2) > 0 && x.size(2) <= std::numeric_limits<int32_t>::max() / 4, name,
              ": D = ", x.size(2), " is out of range");
}

}  // namespace

// ---------------------------------------------------------------- leap_connect

std::tuple<at::Tensor, at::Tensor> leap_connect_fwd(const at::Tensor& x_start, const at::Tensor& v,
                                                    const at::Tensor& x_real, double c) {
  constexpr const char* name = "leap_connect_fwd";
  TORCH_CHECK(x_start.is_cuda() && v.is_cuda() && x_real.is_cuda(), name,
              ": x_start, v and x_real must be CUDA tensors, got devices ", x_start.device(), ", ",
              v.device(), ", ", x_real.device());
  TORCH_CHECK(v.device() == x_start.device() && x_real.device() == x_start.device(), name,
              ": x_start, v and x_real must be on the same device, got ", x_start.device(), ", ",
              v.device(), ", ", x_real.device());
  TORCH_CHECK(x_start.dim() >= 1, name, ": x_start must have a batch dimension, got a ",
              x_start.dim(), "-d tensor");
  TORCH_CHECK(v.sizes() == x_start.sizes() && x_real.sizes() == x_start.sizes(), name,
              ": x_start, v and x_real must have the same shape, got ", x_start.sizes(), ", ",
              v.sizes(), ", ", x_real.sizes());
  TORCH_CHECK(x_start.scalar_type() == x_real.scalar_type(), name,
              ": x_start and x_real must share a dtype, got x_start ", x_start.scalar_type(),
              " and x_real ", x_real.scalar_type());
  TORCH_CHECK(supported(x_start.scalar_type()) && supported(v.scalar_type()), name,
              ": dtypes must be float32, bfloat16 or float16, got x_start/x_real ",
              x_start.scalar_type(), " and v ", v.scalar_type());

  c10::cuda::CUDAGuard guard(x_start.device());
  const at::Tensor xs = x_start.contiguous();
  const at::Tensor vv = v.contiguous();
  const at::Tensor xr = x_real.contiguous();
  const int64_t B = xs.size(0);
  const int64_t N = B > 0 ? xs.numel() / B : 0;
  at::Tensor out = at::empty(xr.sizes(), xr.options());
  at::Tensor dist = at::empty({B}, xs.options().dtype(at::kDouble));
  if (B == 0) return {out, dist};
  if (N == 0) {  // mean over no elements, as torch.mean
    dist.fill_(std::numeric_limits<double>::quiet_NaN());
    return {out, dist};
  }
  const int64_t bps = leap_connect_blocks_per_sample(N);
  TORCH_CHECK(B * bps <= std::numeric_limits<int32_t>::max(), name, ": batch size ", B,
              " is too large");
  at::Tensor partial = at::empty({B * bps}, dist.options());
  C10_CUDA_CHECK(leap_connect_fwd_launch(
      tag(xs.scalar_type()), tag(vv.scalar_type()), xs.const_data_ptr(), vv.const_data_ptr(),
      xr.const_data_ptr(), out.mutable_data_ptr(), partial.mutable_data_ptr<double>(),
      dist.mutable_data_ptr<double>(), static_cast<float>(c), B, N,
      c10::cuda::getCurrentCUDAStream()));
  return {out, dist};
}

std::tuple<at::Tensor, at::Tensor> leap_connect_bwd(const at::Tensor& g_, double c) {
  constexpr const char* name = "leap_connect_bwd";
  TORCH_CHECK(g_.is_cuda(), name, ": g must be a CUDA tensor, got ", g_.device());
  TORCH_CHECK(supported(g_.scalar_type()), name, ": g must be float32, bfloat16 or float16, got ",
              g_.scalar_type());
  c10::cuda::CUDAGuard guard(g_.device());
  const at::Tensor g = g_.contiguous();
  at::Tensor gx = at::empty(g.sizes(), g.options());
  at::Tensor gv = at::empty(g.sizes(), g.options());
  if (g.numel() == 0) return {gx, gv};
  // -c rounded to fp32 as torch does for `-c * g`, then one fp32 multiply per element
  C10_CUDA_CHECK(leap_connect_bwd_launch(tag(g.scalar_type()), g.const_data_ptr(),
                                         gx.mutable_data_ptr(), gv.mutable_data_ptr(),
                                         static_cast<float>(-c), g.numel(),
                                         c10::cuda::getCurrentCUDAStream()));
  return {gx, gv};
}

// ---------------------------------------------------------------- mod_layernorm

std::tuple<at::Tensor, at::Tensor, at::Tensor> mod_layernorm_fwd(const at::Tensor& x,
                                                                 const at::Tensor& scale_,
                                                                 const at::Tensor& shift_,
                                                                 double eps) {
  constexpr const char* name = "mod_layernorm_fwd";
  TORCH_CHECK(x.is_cuda() && scale_.is_cuda() && shift_.is_cuda(), name,
              ": x, scale and shift must be CUDA tensors, got devices ", x.device(), ", ",
              scale_.device(), ", ", shift_.device());
  TORCH_CHECK(scale_.device() == x.device() && shift_.device() == x.device(), name,
              ": x, scale and shift must be on the same device, got ", x.device(), ", ",
              scale_.device(), ", ", shift_.device());
  check_ln_shapes(name, x, scale_);
  TORCH_CHECK(shift_.sizes() == scale_.sizes(), name, ": shift must be (B, D) like scale, got ",
              shift_.sizes());
  TORCH_CHECK(shift_.scalar_type() == x.scalar_type(), name, ": shift must have x's dtype, got x ",
              x.scalar_type(), " and shift ", shift_.scalar_type());
  TORCH_CHECK(x.is_contiguous(), name, ": x must be contiguous (call .contiguous()), got strides ",
              x.strides(), " for shape ", x.sizes());

  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor scale = scale_.contiguous();
  const at::Tensor shift = shift_.contiguous();
  const int64_t B = x.size(0), M = x.size(1), D = x.size(2);
  const int64_t rows = B * M;
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor mean = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0) return {y, mean, rstd};
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), name, ": too many rows (", rows, ")");
  check_smem(name, D, mod_layernorm_fwd_smem(D));
  C10_CUDA_CHECK(mod_layernorm_fwd_launch(
      tag(x.scalar_type()), x.const_data_ptr(), scale.const_data_ptr(), shift.const_data_ptr(),
      y.mutable_data_ptr(), mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), rows,
      M, static_cast<int>(D), static_cast<float>(eps), c10::cuda::getCurrentCUDAStream()));
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mod_layernorm_bwd(const at::Tensor& g_y_,
                                                                 const at::Tensor& x_,
                                                                 const at::Tensor& scale_,
                                                                 const at::Tensor& mean_,
                                                                 const at::Tensor& rstd_) {
  constexpr const char* name = "mod_layernorm_bwd";
  for (const at::Tensor* t : {&g_y_, &x_, &scale_, &mean_, &rstd_}) {
    TORCH_CHECK(t->is_cuda(), name, ": g_y, x, scale, mean and rstd must be CUDA tensors, got one on ",
                t->device());
    TORCH_CHECK(t->device() == x_.device(), name, ": all inputs must be on x's device ",
                x_.device(), ", got one on ", t->device());
  }
  check_ln_shapes(name, x_, scale_);
  TORCH_CHECK(g_y_.sizes() == x_.sizes(), name, ": g_y must have x's shape ", x_.sizes(),
              ", got ", g_y_.sizes());
  TORCH_CHECK(g_y_.scalar_type() == x_.scalar_type(), name, ": g_y must have x's dtype, got g_y ",
              g_y_.scalar_type(), " and x ", x_.scalar_type());
  const int64_t B = x_.size(0), M = x_.size(1), D = x_.size(2);
  const int64_t rows = B * M;
  TORCH_CHECK(mean_.scalar_type() == at::kFloat && rstd_.scalar_type() == at::kFloat, name,
              ": mean and rstd must be float32, got ", mean_.scalar_type(), " and ",
              rstd_.scalar_type());
  TORCH_CHECK(mean_.numel() == rows && rstd_.numel() == rows, name,
              ": mean and rstd must have B*M = ", rows, " elements, got ", mean_.numel(), " and ",
              rstd_.numel());

  c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor g_y = g_y_.contiguous();
  const at::Tensor x = x_.contiguous();
  const at::Tensor scale = scale_.contiguous();
  const at::Tensor mean = mean_.contiguous();
  const at::Tensor rstd = rstd_.contiguous();
  at::Tensor g_x = at::empty(x.sizes(), x.options());
  at::Tensor g_scale = at::empty({B, D}, scale.options());
  at::Tensor g_shift = at::empty({B, D}, scale.options());
  if (B == 0) return {g_x, g_scale, g_shift};
  if (M == 0) {  // sums over no rows
    g_scale.zero_();
    g_shift.zero_();
    return {g_x, g_scale, g_shift};
  }
  TORCH_CHECK(B <= 65535, name, ": batch size ", B, " is above 65535");
  check_smem(name, D, mod_layernorm_bwd_smem(D));
  const int64_t chunks =
      mod_layernorm_bwd_chunks(B, M, device_attr(cudaDevAttrMultiProcessorCount));
  at::Tensor part = at::empty({2, B, chunks, D}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(mod_layernorm_bwd_launch(
      tag(x.scalar_type()), g_y.const_data_ptr(), x.const_data_ptr(), scale.const_data_ptr(),
      mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(), g_x.mutable_data_ptr(),
      g_scale.mutable_data_ptr(), g_shift.mutable_data_ptr(), part.mutable_data_ptr<float>(), B, M,
      static_cast<int>(D), chunks, c10::cuda::getCurrentCUDAStream()));
  return {g_x, g_scale, g_shift};
}

}  // namespace leapalign

// ---------------------------------------------------------------- registration

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#define LEAPALIGN_CONCAT_(a, b) a##b
#define LEAPALIGN_CONCAT(a, b) LEAPALIGN_CONCAT_(a, b)
#define LEAPALIGN_STR_(a) #a
#define LEAPALIGN_STR(a) LEAPALIGN_STR_(a)

// PyInit_<TORCH_EXTENSION_NAME>: `_C` under setup.py, the JIT name under cpp_extension.load.
PyMODINIT_FUNC LEAPALIGN_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      LEAPALIGN_STR(TORCH_EXTENSION_NAME),                        // name
      "leapalign CUDA ops, registered as torch.ops.leapalign.*",  // doc
      -1,                                                         // no per-interpreter state
      nullptr,                                                    // no methods
      nullptr,                                                    // single-phase init
      nullptr,
      nullptr,
      nullptr,
  };
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(leapalign, m) {
  // torch imports this module when it needs the Python fake impls (torch.compile, FakeTensor).
  m.set_python_module("kernels._csrc");
  m.def("leap_connect_fwd(Tensor x_start, Tensor v, Tensor x_real, float c) -> (Tensor out, Tensor dist)");
  m.def("leap_connect_bwd(Tensor g, float c) -> (Tensor g_x_start, Tensor g_v)");
  m.def("mod_layernorm_fwd(Tensor x, Tensor scale, Tensor shift, float eps) -> (Tensor y, Tensor mean, Tensor rstd)");
  m.def("mod_layernorm_bwd(Tensor g_y, Tensor x, Tensor scale, Tensor mean, Tensor rstd) -> (Tensor g_x, Tensor g_scale, Tensor g_shift)");
}

TORCH_LIBRARY_IMPL(leapalign, CUDA, m) {
  m.impl("leap_connect_fwd", &leapalign::leap_connect_fwd);
  m.impl("leap_connect_bwd", &leapalign::leap_connect_bwd);
  m.impl("mod_layernorm_fwd", &leapalign::mod_layernorm_fwd);
  m.impl("mod_layernorm_bwd", &leapalign::mod_layernorm_bwd);
}
