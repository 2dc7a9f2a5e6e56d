// Torch-free host API of the moga CUDA kernels. cuda_ops.cpp (the only torch-facing file) checks arguments,
// allocates outputs and workspaces, and calls these launchers on the current stream.
//
// Conventions: every size, offset and index that can exceed 2^31 is int64_t; q/k/v are (T, H, D) token rows with
// element strides (stride_t, stride_h) and a contiguous last dim; outputs are contiguous. Launchers never
// synchronise with the host; they return the first CUDA error (cudaSuccess when all launches were accepted).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace moga_cuda {

enum class DType { kHalf, kBFloat16 };

// Query tile (rows per CTA of the forward and dQ kernels) and key tile (rows per CTA of the dK/dV kernel).
constexpr int kBlockM = 64;
constexpr int kBlockN = 64;

// Shared-memory tiles are row-major [rows][D + kSmemPad] 16-bit elements (see device_utils.h).
constexpr int kSmemPad = 8;

// Query rows per inner step of the dK/dV kernel: 32 at D = 128 keeps dK, dV, P^T and dP^T (160 fp32 per lane)
// inside the register file without spills.
__host__ __device__ constexpr int dkdv_block_q(int D) { return D == 128 ? 32 : 64; }

// Dynamic shared memory (bytes per CTA) of each attention kernel at head dim D.
constexpr int fwd_smem_bytes(int D) { return (kBlockM + 2 * kBlockN) * (D + kSmemPad) * 2; }  // Q, K, V
constexpr int bwd_dq_smem_bytes(int D) { return 2 * (kBlockM + kBlockN) * (D + kSmemPad) * 2; }  // Q, dO, K, V
constexpr int bwd_dkdv_smem_bytes(int D) {  // K, V, Q, dO, lse, delta
  return 2 * (kBlockN + dkdv_block_q(D)) * (D + kSmemPad) * 2 + 2 * dkdv_block_q(D) * 4;
}
// Opt-in shared memory per block: 163 KB on sm_80 (A100), 227 KB on sm_90 (H100).
constexpr int kMaxSmemSm80 = 163 * 1024;
static_assert(fwd_smem_bytes(128) <= kMaxSmemSm80 && bwd_dq_smem_bytes(128) <= kMaxSmemSm80 &&
                  bwd_dkdv_smem_bytes(128) <= kMaxSmemSm80,
              "attention tiles must fit the shared memory of sm_80");

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tiles of a layout with L positions in S segments cut into `tile`-row tiles: at most cdiv(L, tile) + S.
inline int64_t max_tiles(int64_t L, int64_t S, int64_t tile) { return cdiv(L, tile) + S; }

// ---- sort_by_segment -----------------------------------------------------------------------------------------------

// int64 workspace elements sort_by_segment needs for L keys and S segments.
int64_t sort_workspace_elems(int64_t L, int64_t S);

// Stable counting sort: order (L,) = positions of keys sorted by segment (keys < 0, and keys >= S, which the
// caller must not pass, go last in their original order); offsets (S+1,) segment boundaries in order.
cudaError_t sort_by_segment(const int64_t* keys, int64_t L, int64_t S, int64_t* order, int64_t* offsets,
                            int64_t* workspace, cudaStream_t stream);

// ---- segment attention ---------------------------------------------------------------------------------------------

struct SegmentAttentionArgs {
  DType dtype;
  int head_dim;  // 64 or 128
  const void* q;
  const void* k;
  const void* v;
  int64_t q_stride_t, q_stride_h;
  int64_t k_stride_t, k_stride_h;
  int64_t v_stride_t, v_stride_h;
  int64_t q_tokens, kv_tokens;  // rows of q and of k / v (T)
  int64_t Hq, Hkv;
  const int64_t* q_index;    // (Lq,)
  const int64_t* q_offsets;  // (S+1,)
  const int64_t* k_index;    // (Lk,)
  const int64_t* k_offsets;  // (S+1,)
  int64_t Lq, Lk, S;
  float scale;
};

// int64 workspace elements of the forward / backward launchers (tile tables and their scan temporaries).
int64_t fwd_workspace_elems(const SegmentAttentionArgs& a);
int64_t bwd_workspace_elems(const SegmentAttentionArgs& a);

// out (Lq, Hq, D) contiguous, dtype of q; lse (Hq, Lq) float32. Every element is written.
cudaError_t segment_attention_fwd(const SegmentAttentionArgs& a, void* out, float* lse, int64_t* workspace,
                                  cudaStream_t stream);

struct SegmentAttentionGrads {
  const void* dout;  // (Lq, Hq, D) contiguous
  const void* out;   // (Lq, Hq, D) contiguous
  const float* lse;  // (Hq, Lq) contiguous
  float* delta;      // (Hq, Lq) float32 scratch
  void* dq;          // (q_tokens, Hq, D) contiguous, dtype of q
  void* dk;          // (kv_tokens, Hkv, D)
  void* dv;          // (kv_tokens, Hkv, D)
  // fp32 accumulators (same shapes as dq / dk / dv) used when a token can occur more than once
  // (q_unique / k_unique false); may be null otherwise.
  float* dq_accum;
  float* dk_accum;
  float* dv_accum;
  bool q_unique, k_unique;
};

// Writes every element of dq, dk, dv (zero for tokens that no segment reads).
cudaError_t segment_attention_bwd(const SegmentAttentionArgs& a, const SegmentAttentionGrads& g, int64_t* workspace,
                                  cudaStream_t stream);

// ---- gated un-permute ----------------------------------------------------------------------------------------------

// Element type of out_seg / dout / out / d_out_seg; gates are passed in the accumulation type: float, or double for
// kDouble.
enum class GateDType { kHalf, kBFloat16, kFloat, kDouble };

// out (T, H * D) = sum_j gates[t, j] * out_seg[position[t * K + j]], rows of E = H * D contiguous elements.
// position must be a permutation of [0, T * K) (not checked here). Every element of out is written.
cudaError_t gated_unpermute_fwd(GateDType dtype, const void* out_seg, const int64_t* position, const void* gates,
                                int64_t T, int64_t K, int64_t E, void* out, cudaStream_t stream);

// d_out_seg[position[t * K + j]] = gates[t, j] * dout[t]; d_gates[t, j] = <dout[t], out_seg[position[t * K + j]]>,
// d_gates in the accumulation type. Every element of both is written.
cudaError_t gated_unpermute_bwd(GateDType dtype, const void* dout, const void* out_seg, const int64_t* position,
                                const void* gates, int64_t T, int64_t K, int64_t E, void* d_out_seg, void* d_gates,
                                cudaStream_t stream);

}  // namespace moga_cuda
