// Argument checks and constants shared by the CPU and CUDA kernels.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

namespace ordercomp {

inline void check_act_bits(int64_t bits, bool is_signed) {
  const int64_t low = is_signed ? 2 : 1;
  TORCH_CHECK(bits >= low && bits <= 16, "fake_quant_act: bits must be in ", low, "..16", is_signed ? " when signed" : "",
              ", got ", bits);
}

// Quantization steps on each side of zero: 2^k - 1 unsigned, 2^(k-1) - 1 signed.
inline int64_t act_levels(int64_t bits, bool is_signed) {
  return is_signed ? (int64_t{1} << (bits - 1)) - 1 : (int64_t{1} << bits) - 1;
}

inline void check_weight_bits(int64_t bits) {
  TORCH_CHECK(bits >= 1 && bits <= 32, "quantize_weight: bits must be in 1..32, got ", bits);
}

inline void check_same_device(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", a_name, " and ", b_name, " must be on one device, got ", a.device(),
              " and ", b.device());
}

enum class Criterion { MaxProb, Entropy };

inline Criterion parse_criterion(const std::string& criterion) {
  if (criterion == "maxprob") return Criterion::MaxProb;
  if (criterion == "entropy") return Criterion::Entropy;
  TORCH_CHECK(false, "exit_check: criterion must be 'maxprob' or 'entropy', got '", criterion, "'");
}

inline void check_exit_args(const at::Tensor& logits, double threshold) {
  TORCH_CHECK(logits.dim() == 2, "exit_check: logits must be 2-D [batch, classes], got ", logits.dim(), " dims");
  TORCH_CHECK(logits.size(1) >= 1, "exit_check: logits must have at least one class");
  TORCH_CHECK(threshold >= 0.0 && threshold <= 1.0, "exit_check: threshold must be in [0, 1], got ", threshold);
}

inline void check_accumulate_args(const at::Tensor& counter, const at::Tensor& mask) {
  TORCH_CHECK(counter.dim() == 1, "accumulate_bitops: counter must be 1-D, got ", counter.dim(), " dims");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "accumulate_bitops: active_mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.sizes() == counter.sizes(), "accumulate_bitops: active_mask must have the counter's shape");
  TORCH_CHECK(counter.is_contiguous(), "accumulate_bitops: counter must be contiguous");
  check_same_device("accumulate_bitops", counter, "counter", mask, "active_mask");
}

// Calls f(T{}) with T the element type of a BitOps counter: double, float or int64_t.
template <typename F>
void dispatch_counter(const at::Tensor& counter, F&& f) {
  switch (counter.scalar_type()) {
    case at::kDouble:
      return f(double{});
    case at::kFloat:
      return f(float{});
    case at::kLong:
      return f(int64_t{});
    default:
      TORCH_CHECK(false, "accumulate_bitops: counter must be float64, float32 or int64, got ", counter.scalar_type());
  }
}

// The BitOps to add, in the counter's type (rounded for an integer counter).
template <typename T>
T counter_value(double bitops) {
  return std::is_integral<T>::value ? static_cast<T>(std::llround(bitops)) : static_cast<T>(bitops);
}

}  // namespace ordercomp
