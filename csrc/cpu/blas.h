// Row-major GEMM helpers for the CPU kernels, torch-free.
// float products run the AVX-512 kernel of gemm_f32.h where the CPU has it (use_avx512_gemm()); otherwise, and for
// double, they call the Fortran BLAS (sgemm_/dgemm_) that PyTorch's CPU library already exports (MKL or OpenBLAS);
// the symbols are weak so the extension still loads against a torch built without BLAS, and then a plain
// loop nest (same fp32/fp64 accumulation, just slower) computes the product. Called from inside
// at::parallel_for, where the BLAS runs single-threaded.
#pragma once

#include <cstdint>
#include <type_traits>

#include "gemm_f32.h"

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace moga::cpu {

// Column-major C(m, n) = op(A) op(B) + beta * C, op = transpose where ta/tb == 'T'.
template <typename T>
inline void gemm_colmajor(char ta, char tb, int m, int n, int k, const T* a, int lda, const T* b, int ldb, T beta,
                          T* c, int ldc) {
  const T one = 1;
  if constexpr (sizeof(T) == 4) {
    if (sgemm_ != nullptr) return sgemm_(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc);
  } else {
    if (dgemm_ != nullptr) return dgemm_(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc);
  }
  for (int j = 0; j < n; ++j) {
    // beta == 0 means C is not read (it may hold garbage or NaN), as in BLAS.
    for (int i = 0; i < m; ++i) c[i + int64_t(j) * ldc] = beta == T(0) ? T(0) : beta * c[i + int64_t(j) * ldc];
    for (int p = 0; p < k; ++p) {
      const T bpj = tb == 'T' ? b[j + int64_t(p) * ldb] : b[p + int64_t(j) * ldb];
      for (int i = 0; i < m; ++i) {
        const T aip = ta == 'T' ? a[p + int64_t(i) * lda] : a[i + int64_t(p) * lda];
        c[i + int64_t(j) * ldc] += aip * bpj;
      }
    }
  }
}

// Row-major helpers (a row-major X is the column-major X^T, so C = A B becomes C^T = B^T A^T).
// C[M, N] = A[M, K] B[N, K]^T + beta C
template <typename T>
inline void gemm_abt(int M, int N, int K, const T* A, int lda, const T* B, int ldb, T beta, T* C, int ldc) {
  gemm_colmajor<T>('T', 'N', N, M, K, B, ldb, A, lda, beta, C, ldc);
}
// C[M, N] = A[M, K] B[K, N] + beta C
template <typename T>
inline void gemm_ab(int M, int N, int K, const T* A, int lda, const T* B, int ldb, T beta, T* C, int ldc) {
  if constexpr (std::is_same_v<T, float>) {
    if ((beta == 0.0f || beta == 1.0f) && use_avx512_gemm()) {
      return gemm_f32_avx512(M, N, K, A, lda, 1, B, ldb, C, ldc, beta != 0.0f);
    }
  }
  gemm_colmajor<T>('N', 'N', N, M, K, B, ldb, A, lda, beta, C, ldc);
}
// C[M, N] = A[K, M]^T B[K, N] + beta C
template <typename T>
inline void gemm_atb(int M, int N, int K, const T* A, int lda, const T* B, int ldb, T beta, T* C, int ldc) {
  if constexpr (std::is_same_v<T, float>) {
    if ((beta == 0.0f || beta == 1.0f) && use_avx512_gemm()) {
      return gemm_f32_avx512(M, N, K, A, 1, lda, B, ldb, C, ldc, beta != 0.0f);
    }
  }
  gemm_colmajor<T>('N', 'T', N, M, K, B, ldb, A, lda, beta, C, ldc);
}

}  // namespace moga::cpu
