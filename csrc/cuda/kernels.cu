// CUDA kernels: float32, float16 and bfloat16 inputs, arithmetic in float32. Reductions stay on
// the device (block reduction + atomics), so no op synchronises with the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <math_constants.h>
#include <torch/library.h>

#include <cfloat>
#include <cstdint>
#include <tuple>

#include "../common.h"

namespace ordercomp {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

int blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 8192)));
}

void check_cuda_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, op,
              ": ", name, " must be float32, float16 or bfloat16 on CUDA, got ", t.scalar_type());
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Max of non-negative floats (or NaN) on their bit patterns: they order like their bits, and a NaN
// lies above +inf, so the NaN is kept where fmaxf would drop it (amax and the CPU kernel keep it).
__device__ __forceinline__ float max_keep_nan(float a, float b) {
  return __uint_as_float(max(__float_as_uint(a), __float_as_uint(b)));
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = max_keep_nan(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ int64_t warp_min(int64_t v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const int64_t other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = other < v ? other : v;
  }
  return v;
}

struct SumOp {
  __device__ static float warp(float v) { return warp_sum(v); }
  __device__ static void commit(float v, float* target) { atomicAdd(target, v); }
};

// Non-negative floats order like their bit patterns, so atomicMax on the bits is a float max (NaN kept).
struct MaxOp {
  __device__ static float warp(float v) { return warp_max(v); }
  __device__ static void commit(float v, float* target) {
    atomicMax(reinterpret_cast<unsigned int*>(target), __float_as_uint(v));
  }
};

// Reduces v over the block and commits the result to *target with one atomic per block.
template <typename Op>
__device__ void block_reduce_to(float v, float* target) {
  __shared__ float partial[kThreads / kWarp];
  v = Op::warp(v);
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < blockDim.x / kWarp ? partial[lane] : 0.0f;
    v = Op::warp(v);
    if (lane == 0) Op::commit(v, target);
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Activation fake-quant

template <typename scalar_t>
__global__ void fake_quant_act_kernel(const scalar_t* __restrict__ x, const float* __restrict__ alpha,
                                      scalar_t* __restrict__ out, int8_t* __restrict__ region, int64_t n, float levels,
                                      bool is_signed) {
  const float a = *alpha;
  const float lo = is_signed ? -a : 0.0f;
  const float scale = a / levels;
  const float inv_scale = 1.0f / scale;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    const float v = static_cast<float>(x[i]);
    const float c = v < lo ? lo : (v > a ? a : v);  // NaN passes (fminf/fmaxf would clip it), as on the CPU
    out[i] = static_cast<scalar_t>(nearbyintf(c * inv_scale) * scale);
    region[i] = static_cast<int8_t>((v > a) - (v < lo));
  }
}

std::tuple<at::Tensor, at::Tensor> fake_quant_act_cuda(const at::Tensor& x, const at::Tensor& alpha, int64_t bits,
                                                       bool is_signed) {
  check_cuda_float("fake_quant_act", "x", x);
  check_act_bits(bits, is_signed);
  check_same_device("fake_quant_act", x, "x", alpha, "alpha");
  TORCH_CHECK(alpha.numel() == 1, "fake_quant_act: alpha must hold one value, got ", alpha.numel());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor a = alpha.to(at::kFloat).contiguous();
  at::Tensor out = at::empty_like(xc);
  at::Tensor region = at::empty(xc.sizes(), xc.options().dtype(at::kChar));
  const int64_t n = xc.numel();
  if (n == 0) return {out, region};
  const float levels = static_cast<float>(act_levels(bits, is_signed));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "fake_quant_act_cuda", [&] {
    fake_quant_act_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        xc.data_ptr<scalar_t>(), a.data_ptr<float>(), out.data_ptr<scalar_t>(), region.data_ptr<int8_t>(), n, levels,
        is_signed);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, region};
}

template <typename scalar_t>
__global__ void fake_quant_act_backward_kernel(const scalar_t* __restrict__ grad, const int8_t* __restrict__ region,
                                               scalar_t* __restrict__ grad_x, float* __restrict__ grad_alpha, int64_t n,
                                               bool is_signed) {
  float acc = 0.0f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    const float g = static_cast<float>(grad[i]);
    const int8_t r = region[i];
    grad_x[i] = static_cast<scalar_t>(r == 0 ? g : 0.0f);
    acc += r > 0 ? g : (is_signed && r < 0 ? -g : 0.0f);  // selects: a NaN gradient in region 0 stays out
  }
  block_reduce_to<SumOp>(acc, grad_alpha);
}

std::tuple<at::Tensor, at::Tensor> fake_quant_act_backward_cuda(const at::Tensor& grad, const at::Tensor& region,
                                                                bool is_signed) {
  check_cuda_float("fake_quant_act_backward", "grad", grad);
  TORCH_CHECK(region.scalar_type() == at::kChar, "fake_quant_act_backward: region must be int8");
  TORCH_CHECK(region.sizes() == grad.sizes(), "fake_quant_act_backward: region must have grad's shape");
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor gc = grad.contiguous();
  const at::Tensor rc = region.contiguous();
  at::Tensor grad_x = at::empty_like(gc);
  at::Tensor grad_alpha = at::zeros({}, gc.options().dtype(at::kFloat));
  const int64_t n = gc.numel();
  if (n == 0) return {grad_x, grad_alpha};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "fake_quant_act_backward_cuda", [&] {
    fake_quant_act_backward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        gc.data_ptr<scalar_t>(), rc.data_ptr<int8_t>(), grad_x.data_ptr<scalar_t>(), grad_alpha.data_ptr<float>(), n,
        is_signed);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_x, grad_alpha};
}

// ---------------------------------------------------------------------------------------------
// DoReFa weight quantizer

template <typename scalar_t>
__global__ void abs_reduce_kernel(const scalar_t* __restrict__ w, int64_t n, float* __restrict__ max_out,
                                  float* __restrict__ sum_out) {
  float m = 0.0f;
  float s = 0.0f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    const float v = fabsf(static_cast<float>(w[i]));
    m = max_keep_nan(m, v);
    s += v;
  }
  if (max_out != nullptr) block_reduce_to<MaxOp>(m, max_out);
  if (sum_out != nullptr) block_reduce_to<SumOp>(s, sum_out);
}

// max|tanh(w)| = tanh(max|w|), kept away from zero; NaN if a weight is NaN, so every output is.
__device__ __forceinline__ float tanh_max(const float* max_abs) {
  const float t = tanhf(*max_abs);
  return isnan(t) ? t : fmaxf(t, FLT_MIN);
}

template <typename scalar_t>
__global__ void dorefa_kernel(const scalar_t* __restrict__ w, const float* __restrict__ max_abs,
                              scalar_t* __restrict__ out, int64_t n, float levels) {
  const float m = tanh_max(max_abs);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    const float unit = tanhf(static_cast<float>(w[i])) / m * 0.5f + 0.5f;
    out[i] = static_cast<scalar_t>(2.0f * nearbyintf(unit * levels) / levels - 1.0f);
  }
}

template <typename scalar_t>
__global__ void binary_kernel(const scalar_t* __restrict__ w, const float* __restrict__ abs_sum,
                              scalar_t* __restrict__ out, int64_t n) {
  const float e = *abs_sum / static_cast<float>(n);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    out[i] = static_cast<scalar_t>(static_cast<float>(w[i]) >= 0.0f ? e : -e);
  }
}

at::Tensor quantize_weight_cuda(const at::Tensor& w, int64_t bits) {
  check_cuda_float("quantize_weight", "w", w);
  check_weight_bits(bits);
  const c10::cuda::CUDAGuard guard(w.device());
  const at::Tensor wc = w.contiguous();
  const int64_t n = wc.numel();
  if (bits == 32 || n == 0) return wc.clone();
  at::Tensor out = at::empty_like(wc);
  at::Tensor scratch = at::zeros({1}, wc.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const float levels = static_cast<float>((int64_t{1} << bits) - 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wc.scalar_type(), "quantize_weight_cuda", [&] {
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    float* sp = scratch.data_ptr<float>();
    if (bits == 1) {
      abs_reduce_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(wp, n, nullptr, sp);
      binary_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(wp, sp, out.data_ptr<scalar_t>(), n);
    } else {
      abs_reduce_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(wp, n, sp, nullptr);
      dorefa_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(wp, sp, out.data_ptr<scalar_t>(), n, levels);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// sums[0] += grad * tanh(w); sums[1] += 1 where |tanh(w)| is the maximum.
template <typename scalar_t>
__global__ void dorefa_grad_sums_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ w,
                                        const float* __restrict__ max_abs, float* __restrict__ sums, int64_t n) {
  const float m = tanh_max(max_abs);
  float dot = 0.0f;
  float ties = 0.0f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    const float t = tanhf(static_cast<float>(w[i]));
    dot += static_cast<float>(grad[i]) * t;
    ties += fabsf(t) == m ? 1.0f : 0.0f;
  }
  block_reduce_to<SumOp>(dot, sums);
  block_reduce_to<SumOp>(ties, sums + 1);
}

template <typename scalar_t>
__global__ void dorefa_grad_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ w,
                                   const float* __restrict__ max_abs, const float* __restrict__ sums,
                                   scalar_t* __restrict__ out, int64_t n) {
  const float m = tanh_max(max_abs);
  const float through_max = sums[0] / (m * m * fmaxf(sums[1], 1.0f));
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    const float t = tanhf(static_cast<float>(w[i]));
    const float tie = fabsf(t) == m ? (t > 0.0f ? 1.0f : -1.0f) : 0.0f;
    out[i] = static_cast<scalar_t>((static_cast<float>(grad[i]) / m - through_max * tie) * (1.0f - t * t));
  }
}

at::Tensor quantize_weight_backward_cuda(const at::Tensor& grad, const at::Tensor& w, int64_t bits) {
  check_cuda_float("quantize_weight_backward", "grad", grad);
  check_cuda_float("quantize_weight_backward", "w", w);
  check_weight_bits(bits);
  TORCH_CHECK(grad.sizes() == w.sizes(), "quantize_weight_backward: grad must have w's shape");
  const c10::cuda::CUDAGuard guard(w.device());
  const at::Tensor gc = grad.contiguous().to(w.scalar_type());
  const int64_t n = gc.numel();
  if (bits == 1 || bits == 32 || n == 0) return gc.clone();
  const at::Tensor wc = w.contiguous();
  at::Tensor out = at::empty_like(wc);
  at::Tensor scratch = at::zeros({3}, wc.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wc.scalar_type(), "quantize_weight_backward_cuda", [&] {
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    float* sp = scratch.data_ptr<float>();
    abs_reduce_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(wp, n, sp, nullptr);
    dorefa_grad_sums_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(gp, wp, sp, sp + 1, n);
    dorefa_grad_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(gp, wp, sp, sp + 1,
                                                                         out.data_ptr<scalar_t>(), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---------------------------------------------------------------------------------------------
// Early-exit check: one warp per row.

template <typename scalar_t>
__global__ void exit_check_kernel(const scalar_t* __restrict__ logits, int64_t rows, int64_t cols, float threshold,
                                  bool entropy, float inv_log_c, scalar_t* __restrict__ conf,
                                  int64_t* __restrict__ pred, bool* __restrict__ mask) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp;
  if (row >= rows) return;
  const scalar_t* r = logits + row * cols;
  float best = -INFINITY;
  int64_t arg = cols;
  for (int64_t j = lane; j < cols; j += kWarp) {
    const float v = static_cast<float>(r[j]);
    if (v > best) {
      best = v;
      arg = j;
    }
  }
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const float other = __shfl_xor_sync(0xffffffffu, best, offset);
    const int64_t other_arg = __shfl_xor_sync(0xffffffffu, arg, offset);
    if (other > best || (other == best && other_arg < arg)) {
      best = other;
      arg = other_arg;
    }
  }
  // exp floors d at -87 as the CPU kernel's does: a -inf logit adds ~0 to s and -inf to t.
  float s = 0.0f;
  float t = 0.0f;
  for (int64_t j = lane; j < cols; j += kWarp) {
    const float d = static_cast<float>(r[j]) - best;
    const float e = __expf(fmaxf(d, -87.0f));
    s += e;
    t += e * d;
  }
  s = warp_sum(s);
  t = warp_sum(t);
  // Bad values, settled once per row as on the CPU (t is NaN, or -inf, in every lane alike). Any
  // NaN, any +inf (inf - inf) or only -inf logits make t NaN: no softmax, so the confidence is NaN
  // (no exit) and the prediction the first NaN, if any, as torch.argmax gives. A -inf logit beside
  // a finite maximum makes t -inf: summed again with d floored, so it adds ~0 (p log p -> 0).
  if (isnan(t)) {
    int64_t nan_at = cols;
    for (int64_t j = lane; j < cols; j += kWarp) {
      if (isnan(static_cast<float>(r[j]))) {
        nan_at = j;
        break;
      }
    }
    nan_at = warp_min(nan_at);
    if (lane == 0) {
      conf[row] = static_cast<scalar_t>(CUDART_NAN_F);
      pred[row] = nan_at < cols ? nan_at : (arg < cols ? arg : 0);
      mask[row] = false;
    }
    return;
  }
  if (entropy && t == -INFINITY) {
    t = 0.0f;
    for (int64_t j = lane; j < cols; j += kWarp) {
      const float d = fmaxf(static_cast<float>(r[j]) - best, -87.0f);
      t += __expf(d) * d;
    }
    t = warp_sum(t);
  }
  if (lane == 0) {
    const float c = entropy ? (cols > 1 ? 1.0f - (logf(s) - t / s) * inv_log_c : 1.0f) : 1.0f / s;
    conf[row] = static_cast<scalar_t>(c);
    pred[row] = arg < cols ? arg : 0;
    mask[row] = c >= threshold;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> exit_check_cuda(const at::Tensor& logits, double threshold,
                                                               c10::string_view criterion_name) {
  check_cuda_float("exit_check", "logits", logits);
  check_exit_args(logits, threshold);
  const Criterion criterion = parse_criterion(std::string(criterion_name));
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor lc = logits.contiguous();
  const int64_t rows = lc.size(0);
  const int64_t cols = lc.size(1);
  at::Tensor conf = at::empty({rows}, lc.options());
  at::Tensor pred = at::empty({rows}, lc.options().dtype(at::kLong));
  at::Tensor mask = at::empty({rows}, lc.options().dtype(at::kBool));
  if (rows == 0) return {conf, pred, mask};
  const float inv_log_c = cols > 1 ? static_cast<float>(1.0 / std::log(static_cast<double>(cols))) : 0.0f;
  const int64_t blocks = (rows * kWarp + kThreads - 1) / kThreads;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lc.scalar_type(), "exit_check_cuda", [&] {
    exit_check_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        lc.data_ptr<scalar_t>(), rows, cols, static_cast<float>(threshold), criterion == Criterion::Entropy, inv_log_c,
        conf.data_ptr<scalar_t>(), pred.data_ptr<int64_t>(), mask.data_ptr<bool>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {conf, pred, mask};
}

// ---------------------------------------------------------------------------------------------
// BitOps accumulation

template <typename T>
__global__ void accumulate_kernel(T* __restrict__ counter, const bool* __restrict__ mask, int64_t n, T bitops) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    if (mask[i]) counter[i] += bitops;
  }
}

void accumulate_bitops_cuda(at::Tensor& counter, const at::Tensor& active_mask, double bitops) {
  check_accumulate_args(counter, active_mask);
  const c10::cuda::CUDAGuard guard(counter.device());
  const at::Tensor mc = active_mask.contiguous();
  const int64_t n = counter.numel();
  if (n == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_counter(counter, [&](auto zero) {
    using T = decltype(zero);
    accumulate_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(counter.data_ptr<T>(), mc.data_ptr<bool>(), n,
                                                                  counter_value<T>(bitops));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(ordercomp, CUDA, m) {
  m.impl("fake_quant_act", &fake_quant_act_cuda);
  m.impl("fake_quant_act_backward", &fake_quant_act_backward_cuda);
  m.impl("quantize_weight", &quantize_weight_cuda);
  m.impl("quantize_weight_backward", &quantize_weight_backward_cuda);
  m.impl("exit_check", &exit_check_cuda);
  m.impl("accumulate_bitops", &accumulate_bitops_cuda);
}

}  // namespace ordercomp
