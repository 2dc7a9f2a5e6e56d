// Segment attention backward (moga::segment_attention_bwd on CUDA), FlashAttention-2 style. Torch-free.
//
//   1. delta[h, p] = sum_d dout[p, h, d] * out[p, h, d]                         (one warp per row)
//   2. dQ: one CTA per (query tile of a segment, query head), looping over the segment's key tiles:
//      P = exp(scale * Q K^T - lse), dP = dO V^T, dS = P * (dP - delta), dQ += scale * dS K.
//   3. dK, dV: one CTA per (key tile of a segment, kv head), looping over the query heads of that kv head and
//      the segment's query tiles, with keys as MMA rows: P^T = exp(scale * K Q^T - lse), dV += P^T dO,
//      dP^T = V dO^T, dS^T = P^T * (dP^T - delta), dK += scale * dS^T Q. Summing the query heads of a GQA group
//      inside the CTA needs no atomics.
// Gradients land in token space: a token read once (q_unique / k_unique) gets its row written directly into a
// zeroed output; otherwise rows are added with fp32 atomics into a zeroed fp32 buffer that is converted at the
// end. Tokens that no segment reads stay zero.
#include <math.h>

#include "device_utils.h"
#include "moga_cuda.h"
#include "scan.h"

namespace moga_cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
static_assert(kBlockM == kWarps * 16 && kBlockN == kWarps * 16, "each warp owns 16 MMA rows");


template <typename T, int D>
__global__ void delta_kernel(const T* __restrict__ dout, const T* __restrict__ out, float* __restrict__ delta,
                             int64_t Lq, int64_t Hq) {
  const int lane = threadIdx.x % 32;
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t row = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32; row < Lq * Hq;
       row += warps_total) {
    float acc = 0.f;
    for (int d = lane; d < D; d += 32) acc += to_float(dout[row * D + d]) * to_float(out[row * D + d]);
    for (int m = 16; m > 0; m /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, m);
    if (lane == 0) delta[(row % Hq) * Lq + row / Hq] = acc;
  }
}

// Writes (or, when `accumulate`, adds in fp32) this warp's 16 x D gradient rows: row r of the warp goes to token
// index[pos0 + r] of a (T, H, D) tensor at head h. Rows >= nvalid are skipped.
template <typename T, int D>
__device__ __forceinline__ void store_grad_rows(const float (&c)[D / 8][4], float mul, const int64_t* index,
                                                int64_t pos0, int nvalid, int64_t H, int64_t h, T* direct,
                                                float* accum, bool accumulate) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp * 16 + g + 8 * r;
    if (row >= nvalid) continue;
    const int64_t base = (index[pos0 + row] * H + h) * D + 2 * t;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      const float x = c[dn][2 * r] * mul, y = c[dn][2 * r + 1] * mul;
      if (accumulate) {
        atomicAdd(accum + base + dn * 8, x);
        atomicAdd(accum + base + dn * 8 + 1, y);
      } else {
        store2<T>(direct + base + dn * 8, x, y);
      }
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    segment_attn_bwd_dq_kernel(const SegmentAttentionArgs a, const SegmentAttentionGrads gr,
                               const int64_t* __restrict__ tiles) {
  constexpr int ld = D + kSmemPad;
  constexpr int kTilesN = kBlockN / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);  // [BM][ld]
  T* do_s = q_s + kBlockM * ld;             // [BM][ld]
  T* k_s = do_s + kBlockM * ld;             // [BN][ld]
  T* v_s = k_s + kBlockN * ld;              // [BN][ld]

  const int64_t seg = tiles[2 * static_cast<int64_t>(blockIdx.x)];
  if (seg < 0) return;
  const int64_t tile = tiles[2 * static_cast<int64_t>(blockIdx.x) + 1];
  const int64_t h = blockIdx.y;
  const int64_t hk = h / (a.Hq / a.Hkv);
  const int64_t q_begin = a.q_offsets[seg] + tile * kBlockM;
  const int q_rows = static_cast<int>(min(static_cast<int64_t>(kBlockM), a.q_offsets[seg + 1] - q_begin));
  const int64_t k_begin = a.k_offsets[seg];
  const int64_t k_len = a.k_offsets[seg + 1] - k_begin;

  gather_rows_async<T, kBlockM, D, kThreads>(q_s, static_cast<const T*>(a.q) + h * a.q_stride_h, a.q_stride_t,
                                              a.q_index, q_begin, q_rows);
  // dout is (Lq, Hq, D) in segment order: row = position, no index.
  gather_rows_async<T, kBlockM, D, kThreads>(do_s, static_cast<const T*>(gr.dout) + h * D, a.Hq * D, nullptr,
                                              q_begin, q_rows);
  cp_async_commit();
  const T* k_base = static_cast<const T*>(a.k) + hk * a.k_stride_h;
  const T* v_base = static_cast<const T*>(a.v) + hk * a.v_stride_h;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const float scale_log2 = a.scale * kLog2e;
  float lse_log2[2], delta[2];  // rows g, g+8 of this warp
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp * 16 + g + 8 * r;
    const bool valid = row < q_rows;
    lse_log2[r] = valid ? gr.lse[h * a.Lq + q_begin + row] * kLog2e : 0.f;
    delta[r] = valid ? gr.delta[h * a.Lq + q_begin + row] : 0.f;
  }

  float dq[D / 8][4];  // [16, D]
  zero(dq);
  for (int64_t kb = 0; kb < k_len; kb += kBlockN) {
    const int k_rows = static_cast<int>(min(static_cast<int64_t>(kBlockN), k_len - kb));
    __syncthreads();
    gather_rows_async<T, kBlockN, D, kThreads>(k_s, k_base, a.k_stride_t, a.k_index, k_begin + kb, k_rows);
    gather_rows_async<T, kBlockN, D, kThreads>(v_s, v_base, a.v_stride_t, a.k_index, k_begin + kb, k_rows);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    float p[kTilesN][4];  // [16, BN]
    zero(p);
    mma_a_bt<T, D, kTilesN>(p, q_s, warp * 16, k_s);
#pragma unroll
    for (int j = 0; j < kTilesN; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool key_ok = j * 8 + 2 * t + (e % 2) < k_rows;
        p[j][e] = key_ok ? exp2f(fmaf(p[j][e], scale_log2, -lse_log2[e / 2])) : 0.f;
      }
    float ds[kTilesN][4];  // [16, BN]: dP, then dS
    zero(ds);
    mma_a_bt<T, D, kTilesN>(ds, do_s, warp * 16, v_s);
#pragma unroll
    for (int j = 0; j < kTilesN; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[j][e] = p[j][e] * (ds[j][e] - delta[e / 2]);
    mma_p_b<T, D, kTilesN>(dq, ds, k_s);
  }
  cp_async_wait<0>();
  store_grad_rows<T, D>(dq, a.scale, a.q_index, q_begin, q_rows, a.Hq, h, static_cast<T*>(gr.dq), gr.dq_accum,
                        !gr.q_unique);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    segment_attn_bwd_dkdv_kernel(const SegmentAttentionArgs a, const SegmentAttentionGrads gr,
                                 const int64_t* __restrict__ tiles) {
  constexpr int ld = D + kSmemPad;
  constexpr int kBlockQ = dkdv_block_q(D);
  constexpr int kTilesQ = kBlockQ / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* k_s = reinterpret_cast<T*>(smem_raw);                           // [BN][ld]
  T* v_s = k_s + kBlockN * ld;                                       // [BN][ld]
  T* q_s = v_s + kBlockN * ld;                                       // [BQ][ld]
  T* do_s = q_s + kBlockQ * ld;                                      // [BQ][ld]
  float* lse_s = reinterpret_cast<float*>(do_s + kBlockQ * ld);      // [BQ], log2 units
  float* delta_s = lse_s + kBlockQ;                                  // [BQ]

  const int64_t seg = tiles[2 * static_cast<int64_t>(blockIdx.x)];
  if (seg < 0) return;
  const int64_t tile = tiles[2 * static_cast<int64_t>(blockIdx.x) + 1];
  const int64_t hk = blockIdx.y;
  const int64_t group = a.Hq / a.Hkv;
  const int64_t k_begin = a.k_offsets[seg] + tile * kBlockN;
  const int k_rows = static_cast<int>(min(static_cast<int64_t>(kBlockN), a.k_offsets[seg + 1] - k_begin));
  const int64_t q_seg = a.q_offsets[seg];
  const int64_t q_len = a.q_offsets[seg + 1] - q_seg;

  gather_rows_async<T, kBlockN, D, kThreads>(k_s, static_cast<const T*>(a.k) + hk * a.k_stride_h, a.k_stride_t,
                                              a.k_index, k_begin, k_rows);
  gather_rows_async<T, kBlockN, D, kThreads>(v_s, static_cast<const T*>(a.v) + hk * a.v_stride_h, a.v_stride_t,
                                              a.k_index, k_begin, k_rows);
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int t = lane % 4;
  const float scale_log2 = a.scale * kLog2e;

  float dk[D / 8][4], dv[D / 8][4];  // [16 keys, D] each
  zero(dk);
  zero(dv);
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    for (int64_t qb = 0; qb < q_len; qb += kBlockQ) {
      const int q_rows = static_cast<int>(min(static_cast<int64_t>(kBlockQ), q_len - qb));
      __syncthreads();  // every warp is done with the previous Q, dO tiles
      gather_rows_async<T, kBlockQ, D, kThreads>(q_s, static_cast<const T*>(a.q) + h * a.q_stride_h, a.q_stride_t,
                                                 a.q_index, q_seg + qb, q_rows);
      cp_async_commit();
      gather_rows_async<T, kBlockQ, D, kThreads>(do_s, static_cast<const T*>(gr.dout) + h * D, a.Hq * D, nullptr,
                                                 q_seg + qb, q_rows);
      cp_async_commit();
      for (int i = threadIdx.x; i < kBlockQ; i += kThreads) {
        const bool valid = i < q_rows;  // padding queries: lse = +inf makes their P exactly 0
        lse_s[i] = valid ? gr.lse[h * a.Lq + q_seg + qb + i] * kLog2e : INFINITY;
        delta_s[i] = valid ? gr.delta[h * a.Lq + q_seg + qb + i] : 0.f;
      }
      cp_async_wait<1>();  // K, V and Q have landed; dO loads while P^T = exp(K Q^T - lse) runs
      __syncthreads();

      float p[kTilesQ][4];  // [16 keys, BQ]: P^T
      zero(p);
      mma_a_bt<T, D, kTilesQ>(p, k_s, warp * 16, q_s);
#pragma unroll
      for (int j = 0; j < kTilesQ; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) p[j][e] = exp2f(fmaf(p[j][e], scale_log2, -lse_s[j * 8 + 2 * t + (e % 2)]));
      cp_async_wait<0>();
      __syncthreads();
      mma_p_b<T, D, kTilesQ>(dv, p, do_s);
      float ds[kTilesQ][4];  // [16 keys, BQ]: dP^T, then dS^T
      zero(ds);
      mma_a_bt<T, D, kTilesQ>(ds, v_s, warp * 16, do_s);
#pragma unroll
      for (int j = 0; j < kTilesQ; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) ds[j][e] = p[j][e] * (ds[j][e] - delta_s[j * 8 + 2 * t + (e % 2)]);
      mma_p_b<T, D, kTilesQ>(dk, ds, q_s);
    }
  }
  cp_async_wait<0>();
  const bool accumulate = !gr.k_unique;
  store_grad_rows<T, D>(dk, a.scale, a.k_index, k_begin, k_rows, a.Hkv, hk, static_cast<T*>(gr.dk), gr.dk_accum,
                        accumulate);
  store_grad_rows<T, D>(dv, 1.f, a.k_index, k_begin, k_rows, a.Hkv, hk, static_cast<T*>(gr.dv), gr.dv_accum,
                        accumulate);
}

template <typename T>
__global__ void convert_kernel(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    dst[i] = from_float<T>(src[i]);
  }
}

unsigned grid_for(int64_t work, int threads) {
  const int64_t blocks = cdiv(work, threads);
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks));
}

// Zeroes the output a kernel scatters into: the fp32 buffer when rows accumulate, else the output itself.
template <typename T>
cudaError_t zero_grad(bool unique, void* direct, float* accum, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;  // empty tensors may have null data pointers
  return unique ? cudaMemsetAsync(direct, 0, sizeof(T) * n, stream)
                : cudaMemsetAsync(accum, 0, sizeof(float) * n, stream);
}

template <typename T, int D>
cudaError_t launch_bwd(const SegmentAttentionArgs& a, const SegmentAttentionGrads& g, int64_t* workspace,
                       cudaStream_t stream) {
  const int64_t n_q = a.q_tokens * a.Hq * D, n_kv = a.kv_tokens * a.Hkv * D;
  cudaError_t err;
  if ((err = zero_grad<T>(g.q_unique, g.dq, g.dq_accum, n_q, stream)) != cudaSuccess) return err;
  if ((err = zero_grad<T>(g.k_unique, g.dk, g.dk_accum, n_kv, stream)) != cudaSuccess) return err;
  if ((err = zero_grad<T>(g.k_unique, g.dv, g.dv_accum, n_kv, stream)) != cudaSuccess) return err;

  if (a.Lq > 0 && a.Lk > 0 && a.S > 0 && a.Hq > 0) {
    delta_kernel<T, D><<<grid_for(a.Lq * a.Hq * 32, 256), 256, 0, stream>>>(
        static_cast<const T*>(g.dout), static_cast<const T*>(g.out), g.delta, a.Lq, a.Hq);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;

    const int64_t cap_q = max_tiles(a.Lq, a.S, kBlockM);
    int64_t* table_q = workspace;
    if ((err = build_tile_table(a.q_offsets, a.S, kBlockM, cap_q, table_q, stream)) != cudaSuccess) return err;
    auto dq_kernel = segment_attn_bwd_dq_kernel<T, D>;
    constexpr int dq_smem = bwd_dq_smem_bytes(D);
    if ((err = cudaFuncSetAttribute(dq_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dq_smem)) != cudaSuccess) {
      return err;
    }
    dq_kernel<<<dim3(static_cast<unsigned>(cap_q), static_cast<unsigned>(a.Hq)), kThreads, dq_smem, stream>>>(
        a, g, table_q);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;

    const int64_t cap_k = max_tiles(a.Lk, a.S, kBlockN);
    int64_t* table_k = workspace + tile_table_elems(a.S, cap_q);
    if ((err = build_tile_table(a.k_offsets, a.S, kBlockN, cap_k, table_k, stream)) != cudaSuccess) return err;
    auto dkdv_kernel = segment_attn_bwd_dkdv_kernel<T, D>;
    constexpr int dkdv_smem = bwd_dkdv_smem_bytes(D);
    if ((err = cudaFuncSetAttribute(dkdv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dkdv_smem)) !=
        cudaSuccess) {
      return err;
    }
    dkdv_kernel<<<dim3(static_cast<unsigned>(cap_k), static_cast<unsigned>(a.Hkv)), kThreads, dkdv_smem, stream>>>(
        a, g, table_k);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }

  if (!g.q_unique) convert_kernel<T><<<grid_for(n_q, 256), 256, 0, stream>>>(g.dq_accum, static_cast<T*>(g.dq), n_q);
  if (!g.k_unique) {
    convert_kernel<T><<<grid_for(n_kv, 256), 256, 0, stream>>>(g.dk_accum, static_cast<T*>(g.dk), n_kv);
    convert_kernel<T><<<grid_for(n_kv, 256), 256, 0, stream>>>(g.dv_accum, static_cast<T*>(g.dv), n_kv);
  }
  return cudaGetLastError();
}

}  // namespace

int64_t bwd_workspace_elems(const SegmentAttentionArgs& a) {
  return tile_table_elems(a.S, max_tiles(a.Lq, a.S, kBlockM)) + tile_table_elems(a.S, max_tiles(a.Lk, a.S, kBlockN));
}

cudaError_t segment_attention_bwd(const SegmentAttentionArgs& a, const SegmentAttentionGrads& g, int64_t* workspace,
                                  cudaStream_t stream) {
  if (max_tiles(a.Lq, a.S, kBlockM) > 0x7fffffff || max_tiles(a.Lk, a.S, kBlockN) > 0x7fffffff || a.Hq > 65535) {
    return cudaErrorInvalidConfiguration;
  }
  if (a.dtype == DType::kHalf) {
    return a.head_dim == 64 ? launch_bwd<__half, 64>(a, g, workspace, stream)
                            : launch_bwd<__half, 128>(a, g, workspace, stream);
  }
  return a.head_dim == 64 ? launch_bwd<__nv_bfloat16, 64>(a, g, workspace, stream)
                          : launch_bwd<__nv_bfloat16, 128>(a, g, workspace, stream);
}

}  // namespace moga_cuda
