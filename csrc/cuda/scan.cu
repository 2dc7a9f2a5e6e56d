// Exclusive int64 prefix sum (three passes: chunk sums, scan of the chunk sums, chunk scans) and the device tile
// table of the attention kernels. Torch-free.
#include "scan.h"

namespace moga_cuda {
namespace {

constexpr int kScanThreads = 256;
constexpr int kScanItems = 8;  // consecutive values per thread
constexpr int kScanChunk = kScanThreads * kScanItems;
constexpr int kCarryThreads = 1024;

// Exclusive scan of one value per thread across the block; *total receives the block sum. warp_sums: 32 slots
// of shared memory. Contains __syncthreads: every thread of the block must call it.
__device__ int64_t block_exclusive_scan(int64_t v, int64_t* warp_sums, int64_t* total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, num_warps = blockDim.x / 32;
  int64_t inclusive = v;
  for (int d = 1; d < 32; d *= 2) {
    const int64_t up = __shfl_up_sync(0xffffffffu, inclusive, d);
    if (lane >= d) inclusive += up;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int64_t s = lane < num_warps ? warp_sums[lane] : 0;
    for (int d = 1; d < 32; d *= 2) {
      const int64_t up = __shfl_up_sync(0xffffffffu, s, d);
      if (lane >= d) s += up;
    }
    warp_sums[lane] = s;  // inclusive scan of the warp sums
  }
  __syncthreads();
  const int64_t warp_prefix = warp > 0 ? warp_sums[warp - 1] : 0;
  *total = warp_sums[num_warps - 1];
  __syncthreads();  // warp_sums may be reused by the caller's next call
  return warp_prefix + inclusive - v;
}

// Pass 1: partial[b] = sum of chunk b.
__global__ void __launch_bounds__(kScanThreads) chunk_sums_kernel(const int64_t* in, int64_t n, int64_t* partial) {
  __shared__ int64_t warp_sums[32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kScanChunk + threadIdx.x * kScanItems;
  int64_t local = 0;
  for (int j = 0; j < kScanItems; ++j) local += base + j < n ? in[base + j] : 0;
  int64_t total;
  block_exclusive_scan(local, warp_sums, &total);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// Pass 2 (one block): partial becomes its own exclusive scan; out[n] = grand total.
__global__ void __launch_bounds__(kCarryThreads)
    scan_chunk_sums_kernel(int64_t* partial, int64_t num_chunks, int64_t* out_total) {
  __shared__ int64_t warp_sums[32];
  int64_t carry = 0;
  for (int64_t base = 0; base < num_chunks; base += kCarryThreads) {
    const int64_t i = base + threadIdx.x;
    const int64_t v = i < num_chunks ? partial[i] : 0;
    int64_t total;
    const int64_t ex = block_exclusive_scan(v, warp_sums, &total);
    if (i < num_chunks) partial[i] = carry + ex;
    carry += total;
  }
  if (threadIdx.x == 0) *out_total = carry;
}

// Pass 3: out[i] = partial[chunk of i] + exclusive prefix of i inside its chunk.
__global__ void __launch_bounds__(kScanThreads)
    chunk_scan_kernel(const int64_t* in, int64_t n, const int64_t* partial, int64_t* out) {
  __shared__ int64_t warp_sums[32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kScanChunk + threadIdx.x * kScanItems;
  int64_t vals[kScanItems];
  int64_t local = 0;
  for (int j = 0; j < kScanItems; ++j) {
    vals[j] = base + j < n ? in[base + j] : 0;
    local += vals[j];
  }
  int64_t total;
  int64_t running = partial[blockIdx.x] + block_exclusive_scan(local, warp_sums, &total);
  for (int j = 0; j < kScanItems; ++j) {
    if (base + j < n) out[base + j] = running;
    running += vals[j];
  }
}

__global__ void tile_counts_kernel(const int64_t* offsets, int64_t S, int tile, int64_t* counts) {
  for (int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; s < S;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t len = offsets[s + 1] - offsets[s];
    counts[s] = len > 0 ? (len + tile - 1) / tile : 0;
  }
}

// One warp per segment (grid-stride): its lanes write the segment's tile entries.
__global__ void tile_fill_kernel(const int64_t* starts, int64_t S, int64_t capacity, int64_t* table) {
  const int lane = threadIdx.x % 32;
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t s = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32; s < S; s += warps_total) {
    const int64_t first = starts[s], count = starts[s + 1] - first;
    for (int64_t t = lane; t < count; t += 32) {
      if (first + t < capacity) {  // guards memory if offsets were not non-decreasing
        table[2 * (first + t)] = s;
        table[2 * (first + t) + 1] = t;
      }
    }
  }
}

int grid_for(int64_t work, int threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks));
}

}  // namespace

int64_t scan_workspace_elems(int64_t n) { return (n + kScanChunk - 1) / kScanChunk + 1; }

cudaError_t exclusive_scan(const int64_t* in, int64_t* out, int64_t n, int64_t* workspace, cudaStream_t stream) {
  const int64_t num_chunks = (n + kScanChunk - 1) / kScanChunk;
  int64_t* partial = workspace;
  if (num_chunks > 0) {
    chunk_sums_kernel<<<static_cast<unsigned>(num_chunks), kScanThreads, 0, stream>>>(in, n, partial);
  }
  scan_chunk_sums_kernel<<<1, kCarryThreads, 0, stream>>>(partial, num_chunks, out + n);
  if (num_chunks > 0) {
    chunk_scan_kernel<<<static_cast<unsigned>(num_chunks), kScanThreads, 0, stream>>>(in, n, partial, out);
  }
  return cudaGetLastError();
}

int64_t tile_table_elems(int64_t S, int64_t capacity) {
  return 2 * capacity + S + (S + 1) + scan_workspace_elems(S);
}

cudaError_t build_tile_table(const int64_t* offsets, int64_t S, int tile, int64_t capacity, int64_t* workspace,
                             cudaStream_t stream) {
  int64_t* table = workspace;
  int64_t* counts = table + 2 * capacity;
  int64_t* starts = counts + S;
  int64_t* scan_tmp = starts + S + 1;
  cudaError_t err = cudaMemsetAsync(table, 0xff, sizeof(int64_t) * 2 * capacity, stream);  // all -1
  if (err != cudaSuccess) return err;
  if (S == 0) return cudaSuccess;
  tile_counts_kernel<<<grid_for(S, 256), 256, 0, stream>>>(offsets, S, tile, counts);
  err = exclusive_scan(counts, starts, S, scan_tmp, stream);
  if (err != cudaSuccess) return err;
  tile_fill_kernel<<<grid_for(S * 32, 256), 256, 0, stream>>>(starts, S, capacity, table);
  return cudaGetLastError();
}

}  // namespace moga_cuda
