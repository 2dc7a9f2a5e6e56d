// Row kernels of the CPU segment attention, see vec_math.h. Torch-free: this file compiles in about a second.
#include "vec_math.h"

#include <cmath>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// One clone per ISA level; the loader (ifunc) picks the best the running CPU supports.
#define MOGA_VEC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MOGA_VEC_CLONES
#endif

namespace moga::cpu {
namespace {

// exp(x) for x <= ~0, branch-free so that loops over it vectorise: 2^n * poly(r) with x = n ln2 + r,
// |r| <= ln2 / 2, a degree-7 polynomial (max relative error 8e-8 on [-87, 0], measured against std::exp in
// double). Below -87 the result is clamped to exp(-87) ~ 1.6e-38, which is 0 next to any softmax term >= e^0.
inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  // round(x / ln2) by the 1.5 * 2^23 trick: vectorises where roundf does not.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  // ln2 split into a high part exact in float and a low correction (Cody-Waite).
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

}  // namespace

MOGA_VEC_CLONES float row_max(const float* x, int64_t n) {
  float m = x[0];
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

double row_max(const double* x, int64_t n) {
  double m = x[0];
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

MOGA_VEC_CLONES float exp_sub_sum(float* x, int64_t n, float m) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const float e = exp_nonpos(x[i] - m);
    x[i] = e;
    sum += e;
  }
  return sum;
}

double exp_sub_sum(double* x, int64_t n, double m) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    sum += x[i];
  }
  return sum;
}

MOGA_VEC_CLONES void softmax_grad(float* p, const float* dp, int64_t n, float delta) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) p[i] = p[i] * (dp[i] - delta);
}

void softmax_grad(double* p, const double* dp, int64_t n, double delta) {
  for (int64_t i = 0; i < n; ++i) p[i] = p[i] * (dp[i] - delta);
}

MOGA_VEC_CLONES void scale_row(float* x, int64_t n, float a) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}

void scale_row(double* x, int64_t n, double a) {
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}

}  // namespace moga::cpu
