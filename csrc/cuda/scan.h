// Device-wide building blocks shared by the CUDA launchers (defined in scan.cu): an exclusive prefix sum of int64
// values and the tile table that maps a CTA index to a (segment, tile) pair. Torch-free.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace moga_cuda {

// int64 temporaries exclusive_scan needs for n values.
int64_t scan_workspace_elems(int64_t n);

// out[i] = sum(in[0:i]) for i in [0, n], so out has n + 1 entries and out[n] is the total. in and out must not
// overlap.
cudaError_t exclusive_scan(const int64_t* in, int64_t* out, int64_t n, int64_t* workspace, cudaStream_t stream);

// int64 elements build_tile_table needs in total (table included) for S segments and `capacity` tiles.
int64_t tile_table_elems(int64_t S, int64_t capacity);

// Cuts each segment s (positions offsets[s]:offsets[s+1]) into cdiv(length, tile) tiles and lists them:
// table[2i] = segment, table[2i+1] = tile number within the segment, for i < number of tiles, and -1 for the
// remaining entries up to `capacity` (a CTA reading -1 has no work). workspace holds the table first
// (2 * capacity entries), then the scan temporaries.
cudaError_t build_tile_table(const int64_t* offsets, int64_t S, int tile, int64_t capacity, int64_t* workspace,
                             cudaStream_t stream);

}  // namespace moga_cuda
