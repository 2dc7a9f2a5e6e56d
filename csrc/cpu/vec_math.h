// Row kernels of the CPU segment attention (softmax pieces), torch-free.
// They are compiled once per x86 ISA level with GCC function multi-versioning (target_clones) and chosen at load
// time, so the package stays portable (no -march=native) yet the exp loops run as AVX-512 / AVX2 code where the
// CPU has it. Everything else (the GEMMs) goes through BLAS, see blas.h.
#pragma once

#include <cstdint>

namespace moga::cpu {

// max_i x[i] over n >= 1 entries.
float row_max(const float* x, int64_t n);
double row_max(const double* x, int64_t n);

// x[i] = exp(x[i] - m) for all i; returns the sum of the new values. Requires x[i] - m <= ~0 (softmax).
float exp_sub_sum(float* x, int64_t n, float m);
double exp_sub_sum(double* x, int64_t n, double m);

// p[i] = p[i] * (dp[i] - delta): the softmax backward dS = P * (dP - rowsum(dO * O)).
void softmax_grad(float* p, const float* dp, int64_t n, float delta);
void softmax_grad(double* p, const double* dp, int64_t n, double delta);

// x[i] *= a.
void scale_row(float* x, int64_t n, float a);
void scale_row(double* x, int64_t n, double a);

}  // namespace moga::cpu
