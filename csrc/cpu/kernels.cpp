// CPU kernels: float32, multi-threaded with at::parallel_for. The inner loops are branch-free
// functions with restrict pointers and `omp simd` reductions so the compiler vectorises them; on
// x86-64 each is also cloned for AVX2 and picked at load time (baseline SSE2 stays the fallback).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>

#include "../common.h"

namespace ordercomp {
namespace {

constexpr int64_t kGrain = 32768;

// Helpers are forced inline so every clone vectorises them with its own instruction set.
#define ORDERCOMP_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ORDERCOMP_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
// Loops whose rounding must match PyTorch bit for bit: no fused multiply-add.
#define ORDERCOMP_EXACT __attribute__((optimize("fp-contract=off")))
#else
#define ORDERCOMP_SIMD_CLONES
#define ORDERCOMP_EXACT
#endif

// Round half to even for |v| < 2^22, the same as nearbyint in the default rounding mode, but
// vectorisable: adding 1.5 * 2^23 pushes the fraction out of the mantissa.
ORDERCOMP_INLINE float round_even(float v) {
  constexpr float kMagic = 12582912.0f;
  return (v + kMagic) - kMagic;
}

// exp(x) for x <= 0 (softmax terms), branch-free so loops over it vectorise. Range reduction
// by ln2 and Cephes' degree-7 polynomial: relative error below 2e-7 on [-87, 0]; smaller inputs give 0.
ORDERCOMP_INLINE float exp_nonpositive(float x) {
  x = x > -87.0f ? x : -87.0f;
  const float n = round_even(x * 1.44269504088896341f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// tanh, branch-free (Cephes' odd polynomial below 0.625, (1 - e) / (1 + e) with e = exp(-2|x|)
// above): within a few ulp of libm, and vectorisable. NaN fails the test and takes the
// polynomial, which keeps it NaN, as tanhf does.
ORDERCOMP_INLINE float tanh_fast(float x) {
  const float a = std::fabs(x);
  const float z = a * a;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * a + a;
  const float e = exp_nonpositive(-2.0f * a);
  const float large = (1.0f - e) / (1.0f + e);
  return std::copysign(a >= 0.625f ? large : small, x);
}

void check_cpu_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32 on CPU, got ", t.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// Inner loops (one chunk of a parallel_for each)

ORDERCOMP_SIMD_CLONES ORDERCOMP_EXACT
void fake_quant_chunk(const float* __restrict__ x, float* __restrict__ out, int8_t* __restrict__ region, int64_t n,
                      float lo, float hi, float scale, float inv_scale) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float c = v < lo ? lo : (v > hi ? hi : v);
    out[i] = round_even(c * inv_scale) * scale;
    region[i] = static_cast<int8_t>((v > hi) - (v < lo));
  }
}

// Writes the input gradient and returns this chunk's share of the alpha gradient. Selects, not
// products, route each gradient element, so a NaN one reaches only the input its output depends on.
template <bool kSigned>
ORDERCOMP_SIMD_CLONES float fake_quant_grad_chunk(const float* __restrict__ grad, const int8_t* __restrict__ region,
                                                  float* __restrict__ grad_x, int64_t n) {
  float alpha_grad = 0.0f;
#pragma omp simd reduction(+ : alpha_grad)
  for (int64_t i = 0; i < n; ++i) {
    const float g = grad[i];
    const int8_t r = region[i];
    grad_x[i] = r == 0 ? g : 0.0f;
    alpha_grad += r > 0 ? g : (kSigned && r < 0 ? -g : 0.0f);
  }
  return alpha_grad;
}

// max |p[i]| as a bit pattern. |x| orders like its bits, and a NaN (sign cleared) lies above
// +inf, so an unsigned max keeps a NaN where a float max would drop it, at the same cost.
ORDERCOMP_SIMD_CLONES
uint32_t max_abs_bits_chunk(const float* __restrict__ p, int64_t n) {
  uint32_t m = 0;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, p + i, sizeof(b));
    b &= 0x7fffffffu;
    m = b > m ? b : m;
  }
  return m;
}

ORDERCOMP_SIMD_CLONES
float abs_sum_chunk(const float* __restrict__ p, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += std::fabs(p[i]);
  return s;
}

ORDERCOMP_SIMD_CLONES
void binary_chunk(const float* __restrict__ w, float* __restrict__ out, int64_t n, float e) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] >= 0.0f ? e : -e;
}

ORDERCOMP_SIMD_CLONES
void dorefa_chunk(const float* __restrict__ w, float* __restrict__ out, int64_t n, float m, float levels) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float unit = tanh_fast(w[i]) / m * 0.5f + 0.5f;
    out[i] = 2.0f * round_even(unit * levels) / levels - 1.0f;
  }
}

// Above 2^22 levels round_even no longer applies; such weights are within float precision of w'.
void dorefa_chunk_wide(const float* __restrict__ w, float* __restrict__ out, int64_t n, float m, float levels) {
  for (int64_t i = 0; i < n; ++i) {
    const float unit = tanh_fast(w[i]) / m * 0.5f + 0.5f;
    out[i] = 2.0f * std::nearbyint(unit * levels) / levels - 1.0f;
  }
}

// Stores tanh(w) and returns (sum of grad * tanh(w), number of |tanh(w)| equal to m).
ORDERCOMP_SIMD_CLONES
std::pair<float, float> dorefa_grad_sums_chunk(const float* __restrict__ grad, const float* __restrict__ w,
                                               float* __restrict__ t, int64_t n, float m) {
  float dot = 0.0f;
  float ties = 0.0f;
#pragma omp simd reduction(+ : dot, ties)
  for (int64_t i = 0; i < n; ++i) {
    const float ti = tanh_fast(w[i]);
    t[i] = ti;
    dot += grad[i] * ti;
    ties += std::fabs(ti) == m ? 1.0f : 0.0f;
  }
  return {dot, ties};
}

ORDERCOMP_SIMD_CLONES
void dorefa_grad_chunk(const float* __restrict__ grad, const float* __restrict__ t, float* __restrict__ out,
                       int64_t n, float m, float through_max) {
  const float inv_m = 1.0f / m;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float ti = t[i];
    const float tie = std::fabs(ti) == m ? (ti > 0.0f ? 1.0f : -1.0f) : 0.0f;
    out[i] = (grad[i] * inv_m - through_max * tie) * (1.0f - ti * ti);
  }
}

// First NaN of a row, or -1: torch.argmax ranks NaN above every number.
int64_t first_nan(const float* row, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    if (std::isnan(row[j])) return j;
  }
  return -1;
}

// t again with each shifted logit floored at -87, for a row whose t is -inf: a -inf logit then
// adds ~0, as p log p -> 0 does in the reference. Rare, so kept out of the vectorised loops.
float entropy_sum_floored(const float* row, int64_t cols, float m) {
  float t = 0.0f;
  for (int64_t j = 0; j < cols; ++j) {
    const float d = std::max(row[j] - m, -87.0f);
    t += exp_nonpositive(d) * d;
  }
  return t;
}

// Writes one row's result from s = sum exp(d) and t = sum exp(d) * d over its shifted logits
// d = l - m (m the maximum; exp floors d at -87, so a -inf logit adds ~0 to s but -inf to t).
// maxprob: 1 / s. entropy: H = log(s) - t / s, confidence = 1 - H / log(C) (1 for one class).
// Rows with bad values are settled here, once per row, so the per-element loops test nothing:
// any NaN, any +inf (inf - inf) or only -inf logits make some d, so t, NaN: no softmax, so the
// confidence is NaN (the row never exits) and the prediction the first NaN, if any, as
// torch.argmax gives; a -inf logit beside a finite maximum makes t -inf, summed again floored.
ORDERCOMP_INLINE void finish_row(const float* row, int64_t cols, float m, float s, float t, bool entropy,
                                 float inv_log_c, float threshold, int64_t arg, float* conf, int64_t* pred,
                                 bool* mask) {
  if (std::isnan(t)) {
    const int64_t nan_at = first_nan(row, cols);
    *conf = NAN;
    *pred = nan_at >= 0 ? nan_at : arg;
    *mask = false;
    return;
  }
  if (entropy && t == -INFINITY) t = entropy_sum_floored(row, cols, m);
  const float c = !entropy ? 1.0f / s : (cols > 1 ? 1.0f - (std::log(s) - t / s) * inv_log_c : 1.0f);
  *conf = c;
  *pred = arg;
  *mask = c >= threshold;
}

// Maximum of a row with 16 independent lanes, so the reduction is not one long dependency chain.
ORDERCOMP_INLINE float row_max(const float* __restrict__ row, int64_t n) {
  constexpr int64_t kLanes = 16;
  float lanes[kLanes];
  for (int64_t k = 0; k < kLanes; ++k) lanes[k] = -INFINITY;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) lanes[k] = row[j + k] > lanes[k] ? row[j + k] : lanes[k];
  }
  float m = -INFINITY;
  for (; j < n; ++j) m = row[j] > m ? row[j] : m;
  for (int64_t k = 0; k < kLanes; ++k) m = lanes[k] > m ? lanes[k] : m;
  return m;
}

// First index holding m (the row maximum), testing 16 values at a time.
ORDERCOMP_INLINE int64_t first_index_of(const float* __restrict__ row, int64_t n, float m) {
  constexpr int64_t kLanes = 16;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    int hit = 0;
    for (int64_t k = 0; k < kLanes; ++k) hit |= row[j + k] == m;
    if (hit) break;
  }
  for (; j < n - 1; ++j) {
    if (row[j] == m) return j;
  }
  return n - 1;
}

// Wide rows: each row is read from memory once; its second sweep hits the cache.
ORDERCOMP_SIMD_CLONES
void exit_rows_wide(const float* __restrict__ logits, int64_t rows, int64_t cols, bool entropy, float inv_log_c,
                    float threshold, float* __restrict__ conf, int64_t* __restrict__ pred, bool* __restrict__ mask) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = logits + r * cols;
    const float m = row_max(row, cols);
    const int64_t arg = first_index_of(row, cols, m);
    float s = 0.0f;
    float t = 0.0f;
#pragma omp simd reduction(+ : s, t)
    for (int64_t j = 0; j < cols; ++j) {
      const float d = row[j] - m;
      const float e = exp_nonpositive(d);
      s += e;
      t += e * d;
    }
    finish_row(row, cols, m, s, t, entropy, inv_log_c, threshold, arg, conf + r, pred + r, mask + r);
  }
}

constexpr int64_t kNarrowCols = 32;
constexpr int64_t kNarrowRows = 64;

// Narrow rows (a few classes): per-row loops are too short to vectorise, so a block of rows is
// shifted by its maxima into a small buffer and exponentiated as one flat, vectorised loop.
ORDERCOMP_SIMD_CLONES
void exit_rows_narrow(const float* __restrict__ logits, int64_t rows, int64_t cols, bool entropy, float inv_log_c,
                      float threshold, float* __restrict__ conf, int64_t* __restrict__ pred, bool* __restrict__ mask) {
  float shifted[kNarrowRows * kNarrowCols];
  float expd[kNarrowRows * kNarrowCols];
  float maxima[kNarrowRows];
  for (int64_t r0 = 0; r0 < rows; r0 += kNarrowRows) {
    const int64_t block = std::min(kNarrowRows, rows - r0);
    const float* base = logits + r0 * cols;
    for (int64_t r = 0; r < block; ++r) {
      const float* row = base + r * cols;
      float m = row[0];
      int64_t arg = 0;
      for (int64_t j = 1; j < cols; ++j) {
        if (row[j] > m) {
          m = row[j];
          arg = j;
        }
      }
      maxima[r] = m;
      pred[r0 + r] = arg;
      for (int64_t j = 0; j < cols; ++j) shifted[r * cols + j] = row[j] - m;
    }
    const int64_t n = block * cols;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) expd[i] = exp_nonpositive(shifted[i]);
    for (int64_t r = 0; r < block; ++r) {
      float s = 0.0f;
      float t = 0.0f;
      for (int64_t j = 0; j < cols; ++j) {
        s += expd[r * cols + j];
        t += expd[r * cols + j] * shifted[r * cols + j];
      }
      finish_row(base + r * cols, cols, maxima[r], s, t, entropy, inv_log_c, threshold, pred[r0 + r], conf + r0 + r,
                 pred + r0 + r, mask + r0 + r);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Activation fake-quant

std::tuple<at::Tensor, at::Tensor> fake_quant_act_cpu(const at::Tensor& x, const at::Tensor& alpha, int64_t bits,
                                                      bool is_signed) {
  check_cpu_float("fake_quant_act", "x", x);
  check_act_bits(bits, is_signed);
  check_same_device("fake_quant_act", x, "x", alpha, "alpha");
  TORCH_CHECK(alpha.numel() == 1, "fake_quant_act: alpha must hold one value, got ", alpha.numel());
  const float a = alpha.item<float>();
  TORCH_CHECK(std::isfinite(a) && a > 0.0f, "fake_quant_act: alpha must be finite and > 0, got ", a);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  at::Tensor region = at::empty(xc.sizes(), xc.options().dtype(at::kChar));
  const float scale = a / static_cast<float>(act_levels(bits, is_signed));
  const float* xp = xc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  int8_t* rp = region.data_ptr<int8_t>();
  at::parallel_for(0, xc.numel(), kGrain, [&](int64_t begin, int64_t end) {
    fake_quant_chunk(xp + begin, op + begin, rp + begin, end - begin, is_signed ? -a : 0.0f, a, scale, 1.0f / scale);
  });
  return {out, region};
}

std::tuple<at::Tensor, at::Tensor> fake_quant_act_backward_cpu(const at::Tensor& grad, const at::Tensor& region,
                                                               bool is_signed) {
  check_cpu_float("fake_quant_act_backward", "grad", grad);
  TORCH_CHECK(region.scalar_type() == at::kChar, "fake_quant_act_backward: region must be int8");
  TORCH_CHECK(region.sizes() == grad.sizes(), "fake_quant_act_backward: region must have grad's shape");
  const at::Tensor gc = grad.contiguous();
  const at::Tensor rc = region.contiguous();
  at::Tensor grad_x = at::empty_like(gc);
  const float* gp = gc.data_ptr<float>();
  const int8_t* rp = rc.data_ptr<int8_t>();
  float* gxp = grad_x.data_ptr<float>();
  const auto chunk = is_signed ? fake_quant_grad_chunk<true> : fake_quant_grad_chunk<false>;
  const double total = at::parallel_reduce(
      0, gc.numel(), kGrain, 0.0,
      [&](int64_t begin, int64_t end, double acc) {
        return acc + chunk(gp + begin, rp + begin, gxp + begin, end - begin);
      },
      std::plus<double>());
  return {grad_x, at::scalar_tensor(total, gc.options())};
}

// ---------------------------------------------------------------------------------------------
// DoReFa weight quantizer

// max |tanh(w)| = tanh(max |w|) since tanh is odd and increasing; kept away from 0. NaN if any
// weight is NaN, as amax gives, so that every output and gradient is NaN then.
float tanh_max(const float* p, int64_t n) {
  const uint32_t bits = at::parallel_reduce(
      0, n, kGrain, uint32_t{0},
      [&](int64_t begin, int64_t end, uint32_t acc) {
        return std::max(acc, max_abs_bits_chunk(p + begin, end - begin));
      },
      [](uint32_t a, uint32_t b) { return std::max(a, b); });
  float max_abs;
  std::memcpy(&max_abs, &bits, sizeof(max_abs));
  const float t = tanh_fast(max_abs);
  return std::isnan(t) ? t : std::max(t, FLT_MIN);
}

at::Tensor quantize_weight_cpu(const at::Tensor& w, int64_t bits) {
  check_cpu_float("quantize_weight", "w", w);
  check_weight_bits(bits);
  const at::Tensor wc = w.contiguous();
  if (bits == 32 || wc.numel() == 0) return wc.clone();
  at::Tensor out = at::empty_like(wc);
  const float* wp = wc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t n = wc.numel();
  if (bits == 1) {
    const double sum = at::parallel_reduce(
        0, n, kGrain, 0.0,
        [&](int64_t begin, int64_t end, double acc) { return acc + abs_sum_chunk(wp + begin, end - begin); },
        std::plus<double>());
    const float e = static_cast<float>(sum / static_cast<double>(n));
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) { binary_chunk(wp + begin, op + begin, end - begin, e); });
    return out;
  }
  const float m = tanh_max(wp, n);
  const float levels = static_cast<float>((int64_t{1} << bits) - 1);
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    if (bits <= 22) {
      dorefa_chunk(wp + begin, op + begin, end - begin, m, levels);
    } else {
      dorefa_chunk_wide(wp + begin, op + begin, end - begin, m, levels);
    }
  });
  return out;
}

// d(tanh(w)/m)/dw with m = max|tanh(w)|; the maximum's gradient is shared evenly among ties.
at::Tensor quantize_weight_backward_cpu(const at::Tensor& grad, const at::Tensor& w, int64_t bits) {
  check_cpu_float("quantize_weight_backward", "grad", grad);
  check_cpu_float("quantize_weight_backward", "w", w);
  check_weight_bits(bits);
  TORCH_CHECK(grad.sizes() == w.sizes(), "quantize_weight_backward: grad must have w's shape");
  const at::Tensor gc = grad.contiguous();
  if (bits == 1 || bits == 32 || gc.numel() == 0) return gc.clone();
  const at::Tensor wc = w.contiguous();
  const int64_t n = wc.numel();
  const float* wp = wc.data_ptr<float>();
  const float* gp = gc.data_ptr<float>();
  const float m = tanh_max(wp, n);
  at::Tensor t = at::empty_like(wc);
  float* tp = t.data_ptr<float>();
  using Sums = std::pair<double, double>;
  const Sums sums = at::parallel_reduce(
      0, n, kGrain, Sums{0.0, 0.0},
      [&](int64_t begin, int64_t end, Sums acc) {
        const auto chunk = dorefa_grad_sums_chunk(gp + begin, wp + begin, tp + begin, end - begin, m);
        return Sums{acc.first + chunk.first, acc.second + chunk.second};
      },
      [](Sums a, Sums b) { return Sums{a.first + b.first, a.second + b.second}; });
  const float through_max = static_cast<float>(sums.first / (static_cast<double>(m) * m * std::max(sums.second, 1.0)));
  at::Tensor out = at::empty_like(wc);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    dorefa_grad_chunk(gp + begin, tp + begin, op + begin, end - begin, m, through_max);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Early-exit check

std::tuple<at::Tensor, at::Tensor, at::Tensor> exit_check_cpu(const at::Tensor& logits, double threshold,
                                                              c10::string_view criterion_name) {
  check_cpu_float("exit_check", "logits", logits);
  check_exit_args(logits, threshold);
  const bool entropy = parse_criterion(std::string(criterion_name)) == Criterion::Entropy;
  const at::Tensor lc = logits.contiguous();
  const int64_t rows = lc.size(0);
  const int64_t cols = lc.size(1);
  at::Tensor conf = at::empty({rows}, lc.options());
  at::Tensor pred = at::empty({rows}, lc.options().dtype(at::kLong));
  at::Tensor mask = at::empty({rows}, lc.options().dtype(at::kBool));
  const float* lp = lc.data_ptr<float>();
  float* cp = conf.data_ptr<float>();
  int64_t* pp = pred.data_ptr<int64_t>();
  bool* mp = mask.data_ptr<bool>();
  const float inv_log_c = cols > 1 ? static_cast<float>(1.0 / std::log(static_cast<double>(cols))) : 0.0f;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / cols), [&](int64_t begin, int64_t end) {
    const auto rows_fn = cols <= kNarrowCols ? exit_rows_narrow : exit_rows_wide;
    rows_fn(lp + begin * cols, end - begin, cols, entropy, inv_log_c, static_cast<float>(threshold), cp + begin,
            pp + begin, mp + begin);
  });
  return {conf, pred, mask};
}

// ---------------------------------------------------------------------------------------------
// BitOps accumulation

template <typename T>
void accumulate(T* counter, const bool* mask, int64_t n, T bitops) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) counter[i] += mask[i] ? bitops : T(0);
  });
}

void accumulate_bitops_cpu(at::Tensor& counter, const at::Tensor& active_mask, double bitops) {
  check_accumulate_args(counter, active_mask);
  const at::Tensor mc = active_mask.contiguous();
  dispatch_counter(counter, [&](auto zero) {
    using T = decltype(zero);
    accumulate(counter.data_ptr<T>(), mc.data_ptr<bool>(), counter.numel(), counter_value<T>(bitops));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ordercomp, CPU, m) {
  m.impl("fake_quant_act", &fake_quant_act_cpu);
  m.impl("fake_quant_act_backward", &fake_quant_act_backward_cpu);
  m.impl("quantize_weight", &quantize_weight_cpu);
  m.impl("quantize_weight_backward", &quantize_weight_backward_cpu);
  m.impl("exit_check", &exit_check_cpu);
  m.impl("accumulate_bitops", &accumulate_bitops_cpu);
}

}  // namespace ordercomp
