// Stable counting sort of int64 segment keys (moga::sort_by_segment on CUDA). Torch-free.
//
// Entries are cut into `num_chunks` chunks of `chunk` consecutive entries, one warp (one CTA) per chunk. Bucket
// of an entry: its key in [0, S), or S for an excluded entry (key < 0; a key >= S, which the caller must never
// pass, also lands there rather than writing out of bounds).
//   1. histogram: count[bucket * num_chunks + chunk] (bucket-major, so that
//   2. its exclusive scan gives, for each (bucket, chunk), the first output position of that chunk's entries of
//      that bucket: all entries of lower buckets, then those of the same bucket in earlier chunks);
//      offsets[s] = scanned[s * num_chunks].
//   3. scatter: each warp walks its chunk in order, 32 entries per round; __match_any_sync groups the lanes with
//      equal buckets, a lane's rank inside the round is the number of lower lanes in its group, and the group's
//      lowest lane advances the (bucket, chunk) cursor with one atomicAdd whose old value the group shares.
//      Rounds run in order and an atomic's result is read before the next round starts, so equal keys keep
//      their input order: the sort is stable. O(L) work.
#include "moga_cuda.h"
#include "scan.h"

namespace moga_cuda {
namespace {

constexpr int kEntriesPerChunk = 1024;
// Cap on the (bucket, chunk) counters: with many segments the chunks get longer instead of the table larger.
constexpr int64_t kMaxCounters = int64_t{1} << 22;

struct SortPlan {
  int64_t num_chunks, chunk;
};

SortPlan plan_sort(int64_t L, int64_t S) {
  if (L == 0) return {0, 1};
  int64_t by_budget = kMaxCounters / (S + 1);
  if (by_budget < 1) by_budget = 1;
  int64_t num_chunks = cdiv(L, kEntriesPerChunk);
  if (num_chunks > by_budget) num_chunks = by_budget;
  const int64_t chunk = cdiv(L, num_chunks);
  return {cdiv(L, chunk), chunk};
}

__device__ __forceinline__ int64_t bucket_of(int64_t key, int64_t S) { return (key < 0 || key >= S) ? S : key; }

__global__ void __launch_bounds__(32)
    histogram_kernel(const int64_t* keys, int64_t L, int64_t S, int64_t chunk, int64_t num_chunks,
                     unsigned long long* counts) {
  const int lane = threadIdx.x;
  const int64_t begin = blockIdx.x * chunk;
  const int64_t end = min(L, begin + chunk);
  for (int64_t base = begin; base < end; base += 32) {
    const int64_t i = base + lane;
    const bool valid = i < end;
    const int64_t bucket = valid ? bucket_of(keys[i], S) : -1;
    const unsigned group = __match_any_sync(0xffffffffu, bucket);
    if (valid && lane == __ffs(group) - 1) {
      atomicAdd(&counts[bucket * num_chunks + blockIdx.x], static_cast<unsigned long long>(__popc(group)));
    }
  }
}

__global__ void offsets_kernel(const int64_t* scanned, int64_t S, int64_t num_chunks, int64_t* offsets) {
  for (int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; s <= S;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    offsets[s] = scanned[s * num_chunks];
  }
}

__global__ void __launch_bounds__(32)
    scatter_kernel(const int64_t* keys, int64_t L, int64_t S, int64_t chunk, int64_t num_chunks,
                   unsigned long long* cursor, int64_t* order) {
  const int lane = threadIdx.x;
  const unsigned lower_lanes = (1u << lane) - 1u;
  const int64_t begin = blockIdx.x * chunk;
  const int64_t end = min(L, begin + chunk);
  for (int64_t base = begin; base < end; base += 32) {
    const int64_t i = base + lane;
    const bool valid = i < end;
    const int64_t bucket = valid ? bucket_of(keys[i], S) : -1;
    const unsigned group = __match_any_sync(0xffffffffu, bucket);
    const int leader = __ffs(group) - 1;
    unsigned long long first = 0;
    if (valid && lane == leader) {
      first = atomicAdd(&cursor[bucket * num_chunks + blockIdx.x], static_cast<unsigned long long>(__popc(group)));
    }
    first = __shfl_sync(0xffffffffu, first, leader);
    if (valid) order[first + __popc(group & lower_lanes)] = i;
  }
}

int grid_for(int64_t work, int threads) {
  const int64_t blocks = cdiv(work, threads);
  return static_cast<int>(blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks));
}

}  // namespace

int64_t sort_workspace_elems(int64_t L, int64_t S) {
  const SortPlan p = plan_sort(L, S);
  const int64_t n = (S + 1) * p.num_chunks;
  return n + (n + 1) + scan_workspace_elems(n);
}

cudaError_t sort_by_segment(const int64_t* keys, int64_t L, int64_t S, int64_t* order, int64_t* offsets,
                            int64_t* workspace, cudaStream_t stream) {
  if (L == 0) return cudaMemsetAsync(offsets, 0, sizeof(int64_t) * (S + 1), stream);
  const SortPlan p = plan_sort(L, S);
  const int64_t n = (S + 1) * p.num_chunks;
  int64_t* counts = workspace;
  int64_t* scanned = counts + n;
  int64_t* scan_tmp = scanned + n + 1;
  cudaError_t err = cudaMemsetAsync(counts, 0, sizeof(int64_t) * n, stream);
  if (err != cudaSuccess) return err;
  const unsigned blocks = static_cast<unsigned>(p.num_chunks);
  histogram_kernel<<<blocks, 32, 0, stream>>>(keys, L, S, p.chunk, p.num_chunks,
                                              reinterpret_cast<unsigned long long*>(counts));
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if ((err = exclusive_scan(counts, scanned, n, scan_tmp, stream)) != cudaSuccess) return err;
  offsets_kernel<<<grid_for(S + 1, 256), 256, 0, stream>>>(scanned, S, p.num_chunks, offsets);
  scatter_kernel<<<blocks, 32, 0, stream>>>(keys, L, S, p.chunk, p.num_chunks,
                                            reinterpret_cast<unsigned long long*>(scanned), order);
  return cudaGetLastError();
}

}  // namespace moga_cuda
