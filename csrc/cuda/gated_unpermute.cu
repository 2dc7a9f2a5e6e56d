// Gated un-permute on CUDA (moga::gated_unpermute / gated_unpermute_bwd). Torch-free.
//
// One CTA per token (grid-stride over tokens): its threads stride over the E = H * D elements of a row, so every
// load and store of a row is coalesced. Forward: out[t] = sum_j gates[t, j] * out_seg[position[t * K + j]] in the
// accumulation type (float; double for double rows). Backward: each d_out_seg row has one writer (position is a
// permutation), and d_gates[t, j] is a block reduction (warp shuffles, then one value per warp in shared memory).
// No atomics: results do not depend on scheduling.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "device_utils.h"
#include "moga_cuda.h"

namespace moga_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

// Rows in T, arithmetic in Acc: float and double rows are their own accumulation type; 16-bit rows convert through
// float with device_utils.h's to_float / from_float (round to nearest even).
template <typename Acc, typename T>
__device__ __forceinline__ Acc to_acc(T x) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return static_cast<Acc>(x);
  } else {
    return static_cast<Acc>(to_float(x));
  }
}

template <typename T, typename Acc>
__device__ __forceinline__ T store_value(Acc x) {
  if constexpr (std::is_same_v<T, Acc>) {
    return x;
  } else {
    return from_float<T>(static_cast<float>(x));
  }
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) gated_unpermute_fwd_kernel(const T* __restrict__ out_seg,
                                                                       const int64_t* __restrict__ position,
                                                                       const Acc* __restrict__ gates, int64_t T_,
                                                                       int64_t K, int64_t E, T* __restrict__ out) {
  for (int64_t t = blockIdx.x; t < T_; t += gridDim.x) {
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
      Acc acc = 0;
      for (int64_t j = 0; j < K; ++j) {
        acc += gates[t * K + j] * to_acc<Acc>(out_seg[position[t * K + j] * E + e]);
      }
      out[t * E + e] = store_value<T, Acc>(acc);
    }
  }
}

// Sum of v over the CTA; the result is valid in thread 0. `scratch` holds one value per warp.
template <typename Acc>
__device__ __forceinline__ Acc block_sum(Acc v, Acc* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  Acc total = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  }
  __syncthreads();  // scratch is reused by the next call
  return total;
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) gated_unpermute_bwd_kernel(const T* __restrict__ dout,
                                                                       const T* __restrict__ out_seg,
                                                                       const int64_t* __restrict__ position,
                                                                       const Acc* __restrict__ gates, int64_t T_,
                                                                       int64_t K, int64_t E, T* __restrict__ d_seg,
                                                                       Acc* __restrict__ d_gates) {
  __shared__ Acc scratch[kThreads / 32];
  for (int64_t t = blockIdx.x; t < T_; t += gridDim.x) {
    for (int64_t j = 0; j < K; ++j) {
      const int64_t row = position[t * K + j];
      const Acc g = gates[t * K + j];
      Acc dot = 0;
      for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
        const Acc grad = to_acc<Acc>(dout[t * E + e]);
        d_seg[row * E + e] = store_value<T, Acc>(g * grad);
        dot += grad * to_acc<Acc>(out_seg[row * E + e]);
      }
      const Acc total = block_sum(dot, scratch);
      if (threadIdx.x == 0) d_gates[t * K + j] = total;
    }
  }
}

int blocks_for(int64_t T) { return static_cast<int>(T < kMaxBlocks ? T : kMaxBlocks); }

template <typename T, typename Acc>
cudaError_t launch_fwd(const void* out_seg, const int64_t* position, const void* gates, int64_t T_, int64_t K,
                       int64_t E, void* out, cudaStream_t stream) {
  if (T_ == 0) return cudaSuccess;
  gated_unpermute_fwd_kernel<T, Acc><<<blocks_for(T_), kThreads, 0, stream>>>(
      static_cast<const T*>(out_seg), position, static_cast<const Acc*>(gates), T_, K, E, static_cast<T*>(out));
  return cudaGetLastError();
}

template <typename T, typename Acc>
cudaError_t launch_bwd(const void* dout, const void* out_seg, const int64_t* position, const void* gates, int64_t T_,
                       int64_t K, int64_t E, void* d_seg, void* d_gates, cudaStream_t stream) {
  if (T_ == 0) return cudaSuccess;
  gated_unpermute_bwd_kernel<T, Acc><<<blocks_for(T_), kThreads, 0, stream>>>(
      static_cast<const T*>(dout), static_cast<const T*>(out_seg), position, static_cast<const Acc*>(gates), T_, K, E,
      static_cast<T*>(d_seg), static_cast<Acc*>(d_gates));
  return cudaGetLastError();
}

}  // namespace

cudaError_t gated_unpermute_fwd(GateDType dtype, const void* out_seg, const int64_t* position, const void* gates,
                                int64_t T, int64_t K, int64_t E, void* out, cudaStream_t stream) {
  switch (dtype) {
    case GateDType::kHalf: return launch_fwd<__half, float>(out_seg, position, gates, T, K, E, out, stream);
    case GateDType::kBFloat16:
      return launch_fwd<__nv_bfloat16, float>(out_seg, position, gates, T, K, E, out, stream);
    case GateDType::kFloat: return launch_fwd<float, float>(out_seg, position, gates, T, K, E, out, stream);
    case GateDType::kDouble: return launch_fwd<double, double>(out_seg, position, gates, T, K, E, out, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t gated_unpermute_bwd(GateDType dtype, const void* dout, const void* out_seg, const int64_t* position,
                                const void* gates, int64_t T, int64_t K, int64_t E, void* d_out_seg, void* d_gates,
                                cudaStream_t stream) {
  switch (dtype) {
    case GateDType::kHalf:
      return launch_bwd<__half, float>(dout, out_seg, position, gates, T, K, E, d_out_seg, d_gates, stream);
    case GateDType::kBFloat16:
      return launch_bwd<__nv_bfloat16, float>(dout, out_seg, position, gates, T, K, E, d_out_seg, d_gates, stream);
    case GateDType::kFloat:
      return launch_bwd<float, float>(dout, out_seg, position, gates, T, K, E, d_out_seg, d_gates, stream);
    case GateDType::kDouble:
      return launch_bwd<double, double>(dout, out_seg, position, gates, T, K, E, d_out_seg, d_gates, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace moga_cuda
