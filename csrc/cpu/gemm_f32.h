// fp32 GEMM for the CPU attention tiles, torch-free: an AVX-512 register-blocked kernel, chosen at run time.
//
// Why not only BLAS: the BLAS PyTorch ships (MKL) runs its AVX2 code on AMD CPUs, which halves the fp32 FMA rate
// of an AVX-512 core (measured on the 2-core AMD EPYC dev machine: MKL sgemm 230 GFLOP/s, FMA peak 547 GFLOP/s).
// The attention tiles are small and fixed-shape (K = D or a key tile), which a plain 6 x 64 register tile serves
// well. Accumulation is fp32 in both implementations; only the summation order differs.
#pragma once

#include <cstdint>

namespace moga::cpu {

enum class GemmImpl : int { kAuto = 0, kAvx512 = 1, kBlas = 2 };

// Whether the running CPU (and this build) can run the AVX-512 kernel.
bool avx512_gemm_supported();

// The implementation float GEMMs use: kAuto resolves to kAvx512 where supported, else kBlas.
GemmImpl gemm_impl();

// Sets the implementation (kAvx512 on a CPU without AVX-512 is refused: returns false and changes nothing).
bool set_gemm_impl(GemmImpl impl);

// True when the float GEMMs below run the AVX-512 kernel (the current implementation resolves to kAvx512).
bool use_avx512_gemm();

// C[i, j] = (accumulate ? C[i, j] : 0) + sum_k A[i * a_row + k * a_col] * B[k * ldb + j]
// for i < M, j < N, k < K: A is read through two strides, so it can be a row-major [M, K] (a_col = 1) or the
// transpose of a row-major [K, M] (a_row = 1). B and C are row-major. Call only when avx512_gemm_supported().
void gemm_f32_avx512(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_row, int64_t a_col, const float* B,
                     int64_t ldb, float* C, int64_t ldc, bool accumulate);

}  // namespace moga::cpu
