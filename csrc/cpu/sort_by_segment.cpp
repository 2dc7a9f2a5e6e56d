// CPU moga::sort_by_segment: a stable counting sort of entries by segment key, O(L + threads * S).
//   1. each chunk of entries counts its keys (per-chunk histograms, in parallel);
//   2. an exclusive scan over (bucket, chunk) gives every chunk its first slot in every bucket;
//   3. each chunk scatters its entries in order (in parallel): stable because chunks are ordered within a bucket.
// Bucket S holds the excluded (negative-key) entries, so they land after all segments.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "../ops.h"

namespace moga::cpu {
namespace {

constexpr int64_t kMinChunk = 1 << 16;  // entries per chunk: below this, threads cost more than they save

std::tuple<at::Tensor, at::Tensor> sort_by_segment_cpu(const at::Tensor& keys_in, int64_t num_segments) {
  check_sort_by_segment_args(keys_in, num_segments, at::kCPU);
  const at::Tensor keys_t = keys_in.contiguous();
  const int64_t L = keys_t.numel(), S = num_segments, buckets = S + 1;
  const int64_t* keys = keys_t.const_data_ptr<int64_t>();
  at::Tensor order = empty_output({L}, keys_t.options());
  at::Tensor offsets = empty_output({S + 1}, keys_t.options());
  int64_t* p_order = order.data_ptr<int64_t>();
  int64_t* p_offsets = offsets.data_ptr<int64_t>();

  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), L / kMinChunk));
  const int64_t chunk_len = (L + chunks - 1) / chunks;
  auto bucket_of = [&](int64_t key) { return key < 0 ? S : key; };
  // slots[c * buckets + b]: chunk c's count of bucket b, then (after the scan) its next free slot in bucket b.
  std::vector<int64_t> slots(chunks * buckets, 0);
  std::atomic<int64_t> bad_key_at{-1};

  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* count = slots.data() + c * buckets;
      for (int64_t i = c * chunk_len, end = std::min(L, (c + 1) * chunk_len); i < end; ++i) {
        if (keys[i] >= S) {
          bad_key_at.store(i);
          return;
        }
        ++count[bucket_of(keys[i])];
      }
    }
  });
  const int64_t bad = bad_key_at.load();
  TORCH_CHECK_VALUE(bad < 0, "moga: keys must be < num_segments = ", S, " (or negative to exclude), got keys[", bad,
              "] = ", bad >= 0 ? keys[bad] : 0);

  int64_t running = 0;
  for (int64_t b = 0; b < buckets; ++b) {
    p_offsets[b] = running;  // offsets[S] = first excluded slot = number of included entries
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t count = slots[c * buckets + b];
      slots[c * buckets + b] = running;
      running += count;
    }
  }

  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* next = slots.data() + c * buckets;
      for (int64_t i = c * chunk_len, end = std::min(L, (c + 1) * chunk_len); i < end; ++i) {
        p_order[next[bucket_of(keys[i])]++] = i;
      }
    }
  });
  return {order, offsets};
}

}  // namespace
}  // namespace moga::cpu

TORCH_LIBRARY_IMPL(moga, CPU, m) { m.impl("sort_by_segment", &moga::cpu::sort_by_segment_cpu); }
