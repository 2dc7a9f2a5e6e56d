// Device helpers shared by the attention kernels: tensor-core MMA, ldmatrix, cp.async and fragment packing.
// Torch-free; included only by .cu files.
//
// Fragment layouts of mma.sync.aligned.m16n8k16.row.col (PTX ISA, "Matrix Fragments for mma.m16n8k16"), for
// lane = 4 * g + t (g = lane / 4 in [0, 8), t = lane % 4):
//   A (16 x 16, 4 x b16x2): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B (16 x 8,  2 x b16x2): b0 = B[2t..2t+1][g],  b1 = B[2t+8..2t+9][g]
//   C (16 x 8,  4 x f32):   c0, c1 = C[g][2t], C[g][2t+1];  c2, c3 = C[g+8][2t], C[g+8][2t+1]
// Every asm that touches shared memory has a "memory" clobber so the compiler never moves it across the plain
// stores that zero-fill tiles.
// ldmatrix.x4 loads four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, and register i of
// lane 4g+t receives matrix i's row g, columns 2t..2t+1 (with .trans: rows 2t..2t+1 of column g).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "moga_cuda.h"

namespace moga_cuda {

// Shared-memory tiles are row-major [rows][D + kSmemPad] b16 (kSmemPad in moga_cuda.h): the 16-byte pad shifts
// consecutive rows by four banks, so the eight row addresses of one ldmatrix 8x8 matrix hit distinct banks.

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}

// A fragment of the 16x16 block at tile[row0:row0+16][col0:col0+16] (tile row-major, `ld` elements per row).
// Lane l addresses row row0 + l%8 + 8*((l/8)%2), column col0 + 8*(l/16): matrices (rows 0-7, cols 0-7),
// (rows 8-15, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 8-15) = a0, a1, a2, a3.
template <typename T>
__device__ __forceinline__ void load_a_frag(uint32_t (&a)[4], const T* tile, int ld, int row0, int col0) {
  const int lane = threadIdx.x % 32;
  const int row = row0 + (lane % 8) + 8 * ((lane / 8) % 2);
  const int col = col0 + 8 * (lane / 16);
  ldmatrix_x4(a, tile + row * ld + col);
}

// B fragments of two adjacent n8 tiles for B[k][n] = tile[n][k] (tile stores B transposed, e.g. K[key][d] for
// S = Q K^T), k in [k0, k0+16), n in [n0, n0+16). Lane l addresses row n0 + l%8 + 8*(l/16), column
// k0 + 8*((l/8)%2): matrices (n 0-7, k 0-7) = b0 of n-tile 0, (n 0-7, k 8-15) = b1 of n-tile 0, then the same
// for n 8-15. Result: b[0], b[1] for n-tile 0 and b[2], b[3] for n-tile 1.
template <typename T>
__device__ __forceinline__ void load_b_frag_nk(uint32_t (&b)[4], const T* tile, int ld, int n0, int k0) {
  const int lane = threadIdx.x % 32;
  const int row = n0 + (lane % 8) + 8 * (lane / 16);
  const int col = k0 + 8 * ((lane / 8) % 2);
  ldmatrix_x4(b, tile + row * ld + col);
}

// B fragments of two adjacent n8 tiles for B[k][n] = tile[k][n] (tile stores B as is, e.g. V[key][d] for O = P V),
// through ldmatrix.trans. Lane l addresses row k0 + l%8 + 8*((l/8)%2), column n0 + 8*(l/16): matrices
// (k 0-7, n 0-7) = b0 of n-tile 0, (k 8-15, n 0-7) = b1 of n-tile 0, then the same for n 8-15.
template <typename T>
__device__ __forceinline__ void load_b_frag_kn(uint32_t (&b)[4], const T* tile, int ld, int k0, int n0) {
  const int lane = threadIdx.x % 32;
  const int row = k0 + (lane % 8) + 8 * ((lane / 8) % 2);
  const int col = n0 + 8 * (lane / 16);
  ldmatrix_x4_trans(b, tile + row * ld + col);
}

// c += a * b on tensor cores, fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats -> one b16x2 register, `lo` in the low half (the lower column index, as in every fragment).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// The A fragment (16 rows x 16 k) made of two C fragments: c_lo holds k 0-7, c_hi holds k 8-15. This is how a
// probability tile computed as an MMA output feeds the next MMA as its left operand without leaving registers.
template <typename T>
__device__ __forceinline__ void c_pair_to_a(uint32_t (&a)[4], const float (&c_lo)[4], const float (&c_hi)[4]) {
  a[0] = pack2<T>(c_lo[0], c_lo[1]);
  a[1] = pack2<T>(c_lo[2], c_lo[3]);
  a[2] = pack2<T>(c_hi[0], c_hi[1]);
  a[3] = pack2<T>(c_hi[2], c_hi[3]);
}

template <typename T>
__device__ __forceinline__ void store2(T* p, float x, float y);

template <>
__device__ __forceinline__ void store2<__half>(__half* p, float x, float y) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(x, y);
}

template <>
__device__ __forceinline__ void store2<__nv_bfloat16>(__nv_bfloat16* p, float x, float y) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(x, y);
}

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(smem_dst)), "l"(gmem_src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Gathers ROWS token rows into a shared tile [ROWS][D + kSmemPad] with cp.async (16 bytes per copy): tile row r
// reads row index[pos0 + r] (or pos0 + r itself when index is null) at base + row * stride_t (base already
// points at the head); rows r >= nvalid
// are zero-filled so that masked products are exactly 0 (never 0 * garbage). base and stride_t must be
// 16-byte aligned (checked on the host).
template <typename T, int ROWS, int D, int NTHREADS>
__device__ __forceinline__ void gather_rows_async(T* tile, const T* base, int64_t stride_t, const int64_t* index,
                                                  int64_t pos0, int nvalid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int c = threadIdx.x; c < ROWS * kChunks; c += NTHREADS) {
    const int r = c / kChunks;
    const int ch = c % kChunks;
    T* dst = tile + r * (D + kSmemPad) + ch * 8;
    if (r < nvalid) {
      const int64_t token = index != nullptr ? index[pos0 + r] : pos0 + r;
      cp_async_16(dst, base + token * stride_t + ch * 8);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// Max and sum over the four lanes of a quad (the lanes 4g..4g+3 that share rows g and g+8 of a C fragment).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// c[NT][4] (16 x NT*8) += A * B^T over the head dim, A = rows a_row0..a_row0+15 of a_tile [*][D + kSmemPad] and
// B = rows 0..NT*8-1 of b_tile [*][D + kSmemPad]: a warp's slice of S = Q K^T (or dP = dO V^T, S^T = K Q^T).
template <typename T, int D, int NT>
__device__ __forceinline__ void mma_a_bt(float (&c)[NT][4], const T* a_tile, int a_row0, const T* b_tile) {
  static_assert(NT % 2 == 0 && D % 16 == 0, "tiles come in 16-wide pieces");
  constexpr int ld = D + kSmemPad;
#pragma unroll
  for (int kc = 0; kc < D / 16; ++kc) {
    uint32_t a[4];
    load_a_frag(a, a_tile, ld, a_row0, kc * 16);
#pragma unroll
    for (int n16 = 0; n16 < NT / 2; ++n16) {
      uint32_t b[4];
      load_b_frag_nk(b, b_tile, ld, n16 * 16, kc * 16);
      mma_16816<T>(c[2 * n16], a, b[0], b[1]);
      mma_16816<T>(c[2 * n16 + 1], a, b[2], b[3]);
    }
  }
}

// c[D/8][4] (16 x D) += P * B, P = a 16 x NK*8 tile held as NK C fragments (rounded to T), B = rows
// 0..NK*8-1 of b_tile [*][D + kSmemPad]: a warp's slice of O = P V (or dQ = dS K, dV = P^T dO, dK = dS^T Q).
template <typename T, int D, int NK>
__device__ __forceinline__ void mma_p_b(float (&c)[D / 8][4], const float (&p)[NK][4], const T* b_tile) {
  static_assert(NK % 2 == 0 && D % 16 == 0, "tiles come in 16-wide pieces");
  constexpr int ld = D + kSmemPad;
#pragma unroll
  for (int kk = 0; kk < NK / 2; ++kk) {
    uint32_t a[4];
    c_pair_to_a<T>(a, p[2 * kk], p[2 * kk + 1]);
#pragma unroll
    for (int dn16 = 0; dn16 < D / 16; ++dn16) {
      uint32_t b[4];
      load_b_frag_kn(b, b_tile, ld, kk * 16, dn16 * 16);
      mma_16816<T>(c[2 * dn16], a, b[0], b[1]);
      mma_16816<T>(c[2 * dn16 + 1], a, b[2], b[3]);
    }
  }
}

template <int N>
__device__ __forceinline__ void zero(float (&c)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.f;
}

constexpr float kLog2e = 1.4426950408889634f;

}  // namespace moga_cuda
