// Segment attention forward (moga::segment_attention_fwd on CUDA), FlashAttention-2 style. Torch-free.
//
// One CTA of 4 warps per (query tile of kBlockM positions of one segment, query head); the CTA index finds its
// (segment, tile) in a device tile table, so the grid is sized from host-known bounds (cdiv(Lq, BM) + S tiles)
// and CTAs past the real tile count exit. Q, K and V rows are gathered through q_index / k_index into shared
// memory with cp.async; each warp owns 16 query rows: S = Q K^T and O += P V on tensor cores (mma.m16n8k16),
// online softmax in fp32 registers. Output rows are written in segment order; positions past the last segment
// get zero rows and lse = -inf from a separate tail kernel.
#include <math.h>

#include "device_utils.h"
#include "moga_cuda.h"
#include "scan.h"

namespace moga_cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
static_assert(kBlockM == kWarps * 16, "each warp owns 16 query rows");

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    segment_attn_fwd_kernel(const SegmentAttentionArgs a, T* __restrict__ out, float* __restrict__ lse,
                            const int64_t* __restrict__ tiles) {
  constexpr int ld = D + kSmemPad;
  constexpr int kTilesN = kBlockN / 8;  // n8 MMA tiles per key block
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);  // [BM][ld]
  T* k_s = q_s + kBlockM * ld;              // [BN][ld]
  T* v_s = k_s + kBlockN * ld;              // [BN][ld]

  const int64_t seg = tiles[2 * static_cast<int64_t>(blockIdx.x)];
  if (seg < 0) return;  // past the last tile
  const int64_t tile = tiles[2 * static_cast<int64_t>(blockIdx.x) + 1];
  const int64_t h = blockIdx.y;
  const int64_t hk = h / (a.Hq / a.Hkv);
  const int64_t q_begin = a.q_offsets[seg] + tile * kBlockM;
  const int q_rows = static_cast<int>(min(static_cast<int64_t>(kBlockM), a.q_offsets[seg + 1] - q_begin));
  const int64_t k_begin = a.k_offsets[seg];
  const int64_t k_len = a.k_offsets[seg + 1] - k_begin;

  const T* q_base = static_cast<const T*>(a.q) + h * a.q_stride_h;
  const T* k_base = static_cast<const T*>(a.k) + hk * a.k_stride_h;
  const T* v_base = static_cast<const T*>(a.v) + hk * a.v_stride_h;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;  // this lane holds rows g, g+8 and columns 2t, 2t+1 of each n8 tile
  const float scale_log2 = a.scale * kLog2e;

  float o[D / 8][4];  // [16, D] per warp
  zero(o);
  float row_max[2] = {-INFINITY, -INFINITY};  // rows g, g+8, raw scores (unscaled)
  float row_sum[2] = {0.f, 0.f};              // this lane's share of the row sums

  // Pipeline: V of a tile loads while S = Q K^T runs, and K of the next tile loads while O += P V runs.
  gather_rows_async<T, kBlockM, D, kThreads>(q_s, q_base, a.q_stride_t, a.q_index, q_begin, q_rows);
  if (k_len > 0) {
    gather_rows_async<T, kBlockN, D, kThreads>(k_s, k_base, a.k_stride_t, a.k_index, k_begin,
                                                static_cast<int>(min(static_cast<int64_t>(kBlockN), k_len)));
  }
  cp_async_commit();

  for (int64_t kb = 0; kb < k_len; kb += kBlockN) {
    const int k_rows = static_cast<int>(min(static_cast<int64_t>(kBlockN), k_len - kb));
    cp_async_wait<0>();  // Q and this tile's K have landed
    __syncthreads();     // ... for every thread; and every warp is done with the previous V
    gather_rows_async<T, kBlockN, D, kThreads>(v_s, v_base, a.v_stride_t, a.k_index, k_begin + kb, k_rows);
    cp_async_commit();

    float s[kTilesN][4];  // [16, BN] scores of this warp's rows
    zero(s);
    mma_a_bt<T, D, kTilesN>(s, q_s, warp * 16, k_s);
    if (k_rows < kBlockN) {
#pragma unroll
      for (int j = 0; j < kTilesN; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (j * 8 + 2 * t + (e % 2) >= k_rows) s[j][e] = -INFINITY;
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int j = 0; j < kTilesN; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
      mx = quad_max(mx);  // finite: every key tile holds at least one unmasked key
      const float alpha = exp2f((row_max[r] - mx) * scale_log2);  // 0 on the first tile (row_max = -inf)
      row_max[r] = mx;
      const float shift = mx * scale_log2;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < kTilesN; ++j) {
        s[j][2 * r] = exp2f(fmaf(s[j][2 * r], scale_log2, -shift));
        s[j][2 * r + 1] = exp2f(fmaf(s[j][2 * r + 1], scale_log2, -shift));
        sum += s[j][2 * r] + s[j][2 * r + 1];
      }
      row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        o[dn][2 * r] *= alpha;
        o[dn][2 * r + 1] *= alpha;
      }
    }

    cp_async_wait<0>();  // this tile's V has landed
    __syncthreads();     // ... for every thread; and every warp is done with this tile's K
    if (kb + kBlockN < k_len) {
      const int next_rows = static_cast<int>(min(static_cast<int64_t>(kBlockN), k_len - kb - kBlockN));
      gather_rows_async<T, kBlockN, D, kThreads>(k_s, k_base, a.k_stride_t, a.k_index, k_begin + kb + kBlockN,
                                                  next_rows);
      cp_async_commit();
    }
    mma_p_b<T, D, kTilesN>(o, s, v_s);
  }
  cp_async_wait<0>();  // a segment without keys never waited for its Q copy

  T* out_h = out + h * D;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float total = quad_sum(row_sum[r]);
    const float inv = total > 0.f ? 1.f / total : 0.f;  // no keys: output 0
    const int row = warp * 16 + g + 8 * r;
    if (row < q_rows) {
      const int64_t pos = q_begin + row;
      T* dst = out_h + pos * a.Hq * D;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) store2<T>(dst + dn * 8 + 2 * t, o[dn][2 * r] * inv, o[dn][2 * r + 1] * inv);
      if (t == 0) lse[h * a.Lq + pos] = total > 0.f ? row_max[r] * a.scale + logf(total) : -INFINITY;
    }
  }
}

// Positions >= q_offsets[S] belong to no segment: zero output rows, lse = -inf.
template <typename T, int D>
__global__ void fwd_tail_kernel(T* __restrict__ out, float* __restrict__ lse, const int64_t* __restrict__ q_offsets,
                                int64_t S, int64_t Lq, int64_t Hq) {
  const int64_t end = q_offsets[S];
  constexpr int kVecs = D * 2 / 16;  // uint4 per row
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; row < Lq * Hq; row += stride) {
    const int64_t pos = row / Hq, h = row % Hq;
    if (pos < end) continue;
    uint4* dst = reinterpret_cast<uint4*>(out + row * D);
    for (int i = 0; i < kVecs; ++i) dst[i] = make_uint4(0u, 0u, 0u, 0u);
    lse[h * Lq + pos] = -INFINITY;
  }
}

template <typename T, int D>
cudaError_t launch_fwd(const SegmentAttentionArgs& a, void* out, float* lse, int64_t* workspace,
                       cudaStream_t stream) {
  const int64_t capacity = max_tiles(a.Lq, a.S, kBlockM);
  cudaError_t err = build_tile_table(a.q_offsets, a.S, kBlockM, capacity, workspace, stream);
  if (err != cudaSuccess) return err;
  if (a.Lq == 0 || a.Hq == 0) return cudaSuccess;
  const int64_t rows = a.Lq * a.Hq;
  const int64_t tail_blocks = cdiv(rows, 256) < 65535 ? cdiv(rows, 256) : 65535;
  fwd_tail_kernel<T, D><<<static_cast<unsigned>(tail_blocks), 256, 0, stream>>>(static_cast<T*>(out), lse,
                                                                              a.q_offsets, a.S, a.Lq, a.Hq);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  constexpr int smem = fwd_smem_bytes(D);
  auto kernel = segment_attn_fwd_kernel<T, D>;
  if ((err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem)) != cudaSuccess) {
    return err;
  }
  const dim3 grid(static_cast<unsigned>(capacity), static_cast<unsigned>(a.Hq));
  kernel<<<grid, kThreads, smem, stream>>>(a, static_cast<T*>(out), lse, workspace);
  return cudaGetLastError();
}

}  // namespace

int64_t fwd_workspace_elems(const SegmentAttentionArgs& a) {
  return tile_table_elems(a.S, max_tiles(a.Lq, a.S, kBlockM));
}

cudaError_t segment_attention_fwd(const SegmentAttentionArgs& a, void* out, float* lse, int64_t* workspace,
                                  cudaStream_t stream) {
  if (max_tiles(a.Lq, a.S, kBlockM) > 0x7fffffff || a.Hq > 65535) return cudaErrorInvalidConfiguration;
  if (a.dtype == DType::kHalf) {
    return a.head_dim == 64 ? launch_fwd<__half, 64>(a, out, lse, workspace, stream)
                            : launch_fwd<__half, 128>(a, out, lse, workspace, stream);
  }
  return a.head_dim == 64 ? launch_fwd<__nv_bfloat16, 64>(a, out, lse, workspace, stream)
                          : launch_fwd<__nv_bfloat16, 128>(a, out, lse, workspace, stream);
}

}  // namespace moga_cuda
