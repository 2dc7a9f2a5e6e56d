// fp32 GEMM for the CPU attention tiles, see gemm_f32.h. Torch-free.
#include "gemm_f32.h"

#include <atomic>

#if defined(__x86_64__) && defined(__GNUC__)
#define MOGA_HAVE_AVX512_GEMM 1
#include <immintrin.h>
#else
#define MOGA_HAVE_AVX512_GEMM 0
#endif

namespace moga::cpu {
namespace {

std::atomic<int> g_impl{static_cast<int>(GemmImpl::kAuto)};

}  // namespace

bool avx512_gemm_supported() {
#if MOGA_HAVE_AVX512_GEMM
  // libgcc's CPU model also checks that the OS saves the AVX-512 register state (XCR0).
  static const bool supported = __builtin_cpu_supports("avx512f");
  return supported;
#else
  return false;
#endif
}

GemmImpl gemm_impl() { return static_cast<GemmImpl>(g_impl.load(std::memory_order_relaxed)); }

bool set_gemm_impl(GemmImpl impl) {
  if (impl == GemmImpl::kAvx512 && !avx512_gemm_supported()) return false;
  g_impl.store(static_cast<int>(impl), std::memory_order_relaxed);
  return true;
}

bool use_avx512_gemm() {
  const GemmImpl impl = gemm_impl();
  return impl == GemmImpl::kAvx512 || (impl == GemmImpl::kAuto && avx512_gemm_supported());
}

#if MOGA_HAVE_AVX512_GEMM
namespace {

constexpr int kTileRows = 6;     // MR: rows of C per register tile
constexpr int kTileVectors = 4;  // NV: 16-float vectors per row of the tile (64 columns); 6 * 4 accumulators

// One register tile C[MR, 16 * NV] over the whole K: MR * NV accumulators stay in zmm registers, each step k
// loads one row of B (NV vectors) and broadcasts MR entries of A. Only the last vector of a row is masked
// (`tail` selects its valid columns), so a ragged N costs masked loads/stores, not a scalar loop.
template <int MR, int NV>
__attribute__((target("avx512f"))) void register_tile(int64_t K, const float* A, int64_t a_row, int64_t a_col,
                                                       const float* B, int64_t ldb, float* C, int64_t ldc,
                                                       bool accumulate, __mmask16 tail) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* p_b = B + k * ldb;
    const float* p_a = A + k * a_col;
    __m512 b_row[NV];  // [16 * NV] of B's row k
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      b_row[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(tail, p_b + 16 * v) : _mm512_loadu_ps(p_b + 16 * v);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(p_a[i * a_row]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(a, b_row[v], acc[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* p_c = C + i * ldc + 16 * v;
      const __mmask16 mask = v == NV - 1 ? tail : __mmask16(0xFFFF);
      __m512 out = acc[i][v];
      if (accumulate) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(mask, p_c));
      _mm512_mask_storeu_ps(p_c, mask, out);
    }
  }
}

using TileFn = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t, bool,
                        __mmask16);

template <int MR>
constexpr TileFn tile_for_vectors(int nv) {
  return nv == 1 ? register_tile<MR, 1> : nv == 2 ? register_tile<MR, 2> : nv == 3 ? register_tile<MR, 3>
                                                                                    : register_tile<MR, 4>;
}

TileFn tile_for(int mr, int nv) {
  switch (mr) {
    case 1: return tile_for_vectors<1>(nv);
    case 2: return tile_for_vectors<2>(nv);
    case 3: return tile_for_vectors<3>(nv);
    case 4: return tile_for_vectors<4>(nv);
    case 5: return tile_for_vectors<5>(nv);
    default: return tile_for_vectors<6>(nv);
  }
}

}  // namespace

void gemm_f32_avx512(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_row, int64_t a_col, const float* B,
                     int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  // Column panels of 64 outermost: the panel of B (K x 64) is reused by every row tile of A.
  for (int64_t j0 = 0; j0 < N; j0 += 16 * kTileVectors) {
    const int64_t cols = N - j0 < 16 * kTileVectors ? N - j0 : 16 * kTileVectors;
    const int nv = static_cast<int>((cols + 15) / 16);
    const int last = static_cast<int>(cols - 16 * (nv - 1));  // valid columns of the last vector, 1..16
    const __mmask16 tail = static_cast<__mmask16>((1u << last) - 1u);
    const TileFn full = tile_for(kTileRows, nv);
    int64_t i0 = 0;
    for (; i0 + kTileRows <= M; i0 += kTileRows) {
      full(K, A + i0 * a_row, a_row, a_col, B + j0, ldb, C + i0 * ldc + j0, ldc, accumulate, tail);
    }
    if (i0 < M) {
      tile_for(static_cast<int>(M - i0), nv)(K, A + i0 * a_row, a_row, a_col, B + j0, ldb, C + i0 * ldc + j0, ldc,
                                             accumulate, tail);
    }
  }
}

#else

void gemm_f32_avx512(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*,
                     int64_t, bool) {}

#endif

}  // namespace moga::cpu
