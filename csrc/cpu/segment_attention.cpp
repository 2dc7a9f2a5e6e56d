// CPU segment attention: moga::segment_attention_fwd / _bwd for CPU tensors.
//
// Flash-attention style tiling, parallel over work items with dynamic scheduling:
//   packing:    first, q (times the softmax scale), k, v (and dout in the backward) are gathered once into
//               contiguous head-major acc_t buffers in segment order, (H, L, D): every tile below is then a plain
//               strided block, and no row is gathered or converted more than once (fp32 for fp16/bf16/fp32 inputs,
//               fp64 for fp64). This costs one fp32 copy of the operands in memory, plus transposed copies of k
//               (and of v in the backward) when the products run on moga's AVX-512 GEMM (gemm_f32.h), whose
//               second operand is always row-major: S = Q K^T reads K^T.
//   forward:    item = (segment, query tile, kv head). The query rows of all Hq / Hkv query heads that share the
//               kv head are stacked into one [R = G * bm, D] tile so each K/V tile is reused across the group;
//               online softmax over key tiles; both products are GEMMs (AVX-512 kernel for float, else BLAS).
//   backward:   every gradient row has exactly one writer (no atomics, deterministic). With many balanced
//               segments, item = (segment, kv head) computes all of its gradients in one pass; otherwise two passes:
//               pass 1, item = (segment, key tile, kv head): dK, dV of the tile's key positions;
//               pass 2, item = (segment, query tile, kv head): dQ of the tile's query positions.
// Gradients land in token space: rows are written directly when each token occurs once (q_unique / k_unique),
// otherwise per-position gradients are summed into tokens with index_add_.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../ops.h"
#include "blas.h"
#include "vec_math.h"

namespace moga::cpu {
namespace {

constexpr int64_t kRowsPerTile = 128;  // stacked query rows (G * bm) per tile, before rounding bm down
constexpr int64_t kMinQueryTile = 16;  // bm lower bound for large GQA groups
constexpr int64_t kKeyTile = 256;      // keys per tile in the forward and dQ passes
constexpr int64_t kGradKeyTile = 128;  // keys per tile owned by one dK/dV work item

// A tile of consecutive positions [start, start + len) of one segment.
struct Tile {
  int64_t segment;
  int64_t start;
  int64_t len;
};

// Tiles of every non-empty segment's positions, from the (S + 1,) offsets.
std::vector<Tile> make_tiles(const int64_t* offsets, int64_t S, int64_t tile) {
  std::vector<Tile> tiles;
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t p = offsets[s]; p < offsets[s + 1]; p += tile) tiles.push_back({s, p, std::min(tile, offsets[s + 1] - p)});
  }
  return tiles;
}

// Runs body(item, workspace) for item in [0, n) on at::parallel_for threads, handing out items dynamically
// (segments are ragged, so a static split would leave threads idle). Workspace is per thread.
template <typename Workspace, typename Body>
void for_each_item(int64_t n, const Workspace& prototype, const Body& body) {
  if (n == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    Workspace ws = prototype;
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) body(i, ws);
  });
}

// Layout contents checks (the CPU can read them for free): offsets start at 0, never decrease and stay within
// the positions; every index read by a segment names an existing token row.
void check_layout_contents(const int64_t* index, const int64_t* offsets, int64_t S, int64_t L, int64_t T,
                           const char* index_name, const char* offsets_name) {
  TORCH_CHECK_VALUE(offsets[0] == 0, "moga: ", offsets_name, "[0] must be 0, got ", offsets[0]);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK_VALUE(offsets[s + 1] >= offsets[s], "moga: ", offsets_name, " must be non-decreasing, got ",
                offsets_name, "[", s, "] = ", offsets[s], " > ", offsets_name, "[", s + 1, "] = ", offsets[s + 1]);
  }
  TORCH_CHECK_VALUE(offsets[S] <= L, "moga: ", offsets_name, "[S] = ", offsets[S], " exceeds the number of positions ", L,
              " of ", index_name);
  for (int64_t p = 0; p < offsets[S]; ++p) {
    TORCH_CHECK_VALUE(index[p] >= 0 && index[p] < T, "moga: ", index_name, "[", p, "] = ", index[p],
                " is not a token row in [0, ", T, ")");
  }
}

// A (T, H, D) tensor with a contiguous last dimension, as base pointer and strides.
template <typename scalar_t>
struct Rows {
  const scalar_t* data;
  int64_t stride_token;
  int64_t stride_head;
  const scalar_t* row(int64_t token, int64_t head) const { return data + token * stride_token + head * stride_head; }
};

template <typename scalar_t>
Rows<scalar_t> rows_of(const at::Tensor& t) {
  return {t.const_data_ptr<scalar_t>(), t.stride(0), t.stride(1)};
}

// packed[h, p, :] = mult * src.row(index == nullptr ? p : index[p], h) for p < n, as acc_t: (H, n, D) contiguous.
template <typename scalar_t, typename acc_t>
at::Tensor pack(const Rows<scalar_t>& src, const int64_t* index, int64_t n, int64_t H, int64_t D, acc_t mult) {
  at::Tensor packed = at::empty({H, n, D}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* p_packed = packed.data_ptr<acc_t>();
  at::parallel_for(0, n, 256, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t token = index == nullptr ? p : index[p];
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* p_src = src.row(token, h);
        acc_t* p_dst = p_packed + (h * n + p) * D;
        for (int64_t d = 0; d < D; ++d) p_dst[d] = static_cast<acc_t>(p_src[d]) * mult;
      }
    }
  });
  return packed;
}

// Row length of a transposed pack of n positions: n rounded up to 16 floats, then to an odd multiple of 16, so
// that consecutive rows start an odd number of cache lines apart. With a power-of-two row length (n = 2^k is the
// common case) the rows of a [D, 64] GEMM panel would all map to the same L1 cache sets and evict each other
// (measured: 225 vs 266 GFLOP/s for the scores GEMM at n = 16384 on one core).
inline int64_t transposed_row_length(int64_t n) {
  const int64_t ld = (n + 15) / 16 * 16;
  return (ld / 16) % 2 == 0 ? ld + 16 : ld;
}

// packed_t[h, d, p] = src.row(index[p], h)[d] for p < n, as acc_t: (H, D, ld) with ld = transposed_row_length(n),
// the transposed layout of pack() (without a multiplier); columns n .. ld are padding, never read. Keys in this
// layout make S = Q K^T a plain row-major product for the AVX-512 GEMM.
template <typename scalar_t, typename acc_t>
at::Tensor pack_transposed(const Rows<scalar_t>& src, const int64_t* index, int64_t n, int64_t H, int64_t D) {
  const int64_t ld = transposed_row_length(n);
  at::Tensor packed = at::empty({H, D, ld}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* p_packed = packed.data_ptr<acc_t>();
  // Blocks of 64 positions go through a [D, 64] tile on the stack, so every write to the output is a run of 64
  // contiguous values: writing column by column would hit rows n apart, which alias in the L1 cache for n = 2^k.
  constexpr int64_t kBlock = 64;
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> tile(D * kBlock);  // [D, kBlock]
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t p0 = b * kBlock, len = std::min(n - p0, kBlock);
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t i = 0; i < len; ++i) {
          const scalar_t* p_src = src.row(index[p0 + i], h);
          for (int64_t d = 0; d < D; ++d) tile[d * kBlock + i] = static_cast<acc_t>(p_src[d]);
        }
        acc_t* p_dst = p_packed + h * D * ld + p0;
        for (int64_t d = 0; d < D; ++d) std::copy_n(tile.data() + d * kBlock, len, p_dst + d * ld);
      }
    }
  });
  return packed;
}

// The [G * bm, D] block of rows (head h0 + g, positions p0 .. p0 + bm) of a packed (H, L, D) buffer, stacked
// g-major: a pointer into the buffer itself when G == 1, else a copy into `stack`.
template <typename acc_t>
const acc_t* stacked_rows(const acc_t* packed, int64_t L, int64_t D, int64_t h0, int64_t G, int64_t p0, int64_t bm,
                          acc_t* stack) {
  if (G == 1) return packed + (h0 * L + p0) * D;
  for (int64_t g = 0; g < G; ++g) std::copy_n(packed + ((h0 + g) * L + p0) * D, bm * D, stack + g * bm * D);
  return stack;
}

template <typename scalar_t, typename acc_t>
struct Problem {
  Rows<scalar_t> q, k, v;
  const int64_t *q_index, *q_offsets, *k_index, *k_offsets;
  int64_t S, Lq, Lk, Hq, Hkv, G, D;
  acc_t scale;
  int64_t query_tile;  // bm: query positions per tile, so a tile stacks R = G * bm <= kRowsPerTile rows
};

template <typename scalar_t, typename acc_t>
Problem<scalar_t, acc_t> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& q_index, const at::Tensor& q_offsets,
                                      const at::Tensor& k_index, const at::Tensor& k_offsets, double scale) {
  Problem<scalar_t, acc_t> pb{rows_of<scalar_t>(q), rows_of<scalar_t>(k), rows_of<scalar_t>(v),
                              q_index.const_data_ptr<int64_t>(), q_offsets.const_data_ptr<int64_t>(),
                              k_index.const_data_ptr<int64_t>(), k_offsets.const_data_ptr<int64_t>(),
                              q_offsets.numel() - 1, q_index.numel(), k_index.numel(), q.size(1), k.size(1),
                              q.size(1) / k.size(1), q.size(2), static_cast<acc_t>(scale), 0};
  pb.query_tile = std::max(kMinQueryTile, kRowsPerTile / pb.G);
  check_layout_contents(pb.q_index, pb.q_offsets, pb.S, pb.Lq, q.size(0), "q_index", "q_offsets");
  check_layout_contents(pb.k_index, pb.k_offsets, pb.S, pb.Lk, k.size(0), "k_index", "k_offsets");
  return pb;
}

// ------------------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------------------

template <typename acc_t>
struct FwdWorkspace {
  std::vector<acc_t> q, s, acc, m, l;
  FwdWorkspace(int64_t rows, int64_t keys, int64_t D) : q(rows * D), s(rows * keys), acc(rows * D), m(rows), l(rows) {}
};

// Packed operands, over the positions inside segments only (lq = q_offsets[S], lk = k_offsets[S]):
// q_s = scale * q (Hq, lq, D), k and v (Hkv, lk, D); dout (Hq, lq, D) in the backward.
// With the AVX-512 GEMM (float only) also the transposed copies k_t and v_t (Hkv, D, ld_t) of k and v; a layout
// the pass does not read is nullptr (see PackedStorage).
template <typename acc_t>
struct Packed {
  const acc_t *q_s, *k, *v, *dout;
  int64_t lq, lk;
  const acc_t *k_t, *v_t;
  int64_t ld_t;
};

// out[R, bn] = rows[R, D] X^T for the bn packed rows of X (Hkv, lk, D) starting at (h, k0): from X's transposed copy
// x_t (Hkv, D, ld_t) with the AVX-512 GEMM when the pack made one, else with BLAS on X.
template <typename acc_t>
void times_transposed(int64_t R, int64_t bn, int64_t D, const acc_t* rows, const acc_t* x, const acc_t* x_t,
                      int64_t lk, int64_t ld_t, int64_t h, int64_t k0, acc_t* out, int64_t ld) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (x_t != nullptr) return gemm_f32_avx512(R, bn, D, rows, D, 1, x_t + h * D * ld_t + k0, ld_t, out, ld, false);
  }
  gemm_abt<acc_t>(R, bn, D, rows, D, x + (h * lk + k0) * D, D, acc_t(0), out, ld);
}

// Only the layouts a pass reads are packed. With the AVX-512 GEMM the forward reads k^T (S = Q K^T) and v (P V), the
// backward k^T, v^T (dP = dout V^T) and k (dQ = dS K); with BLAS both read k and v.
template <typename scalar_t, typename acc_t>
struct PackedStorage {
  at::Tensor q_s, k, v, k_t, v_t;  // undefined where not needed
  int64_t lk;
  PackedStorage(const Problem<scalar_t, acc_t>& pb, bool backward)
      : q_s(pack(pb.q, pb.q_index, pb.q_offsets[pb.S], pb.Hq, pb.D, pb.scale)), lk(pb.k_offsets[pb.S]) {
    const bool transposed = std::is_same_v<acc_t, float> && use_avx512_gemm();
    if (!transposed || backward) k = pack(pb.k, pb.k_index, lk, pb.Hkv, pb.D, acc_t(1));
    if (!transposed || !backward) v = pack(pb.v, pb.k_index, lk, pb.Hkv, pb.D, acc_t(1));
    if (transposed) {
      k_t = pack_transposed<scalar_t, acc_t>(pb.k, pb.k_index, lk, pb.Hkv, pb.D);
      if (backward) v_t = pack_transposed<scalar_t, acc_t>(pb.v, pb.k_index, lk, pb.Hkv, pb.D);
    }
  }
  Packed<acc_t> view(const acc_t* dout = nullptr) const {
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<acc_t>() : nullptr; };
    return {q_s.const_data_ptr<acc_t>(), ptr(k), ptr(v), dout, q_s.size(1), lk, ptr(k_t), ptr(v_t),
            transposed_row_length(lk)};
  }
};

// lse_t: float for the op's output; acc_t (double) when the fp64 backward recomputes lse at full precision.
template <typename scalar_t, typename acc_t, typename lse_t>
void forward_tile(const Problem<scalar_t, acc_t>& pb, const Packed<acc_t>& pk, const Tile& tile, int64_t hk,
                  FwdWorkspace<acc_t>& ws, scalar_t* out, lse_t* lse) {
  const int64_t D = pb.D, G = pb.G, bm = tile.len, R = G * bm;
  const int64_t ka = pb.k_offsets[tile.segment], kb = pb.k_offsets[tile.segment + 1];
  if (ka == kb) {  // no keys: zero output, lse = -inf
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = hk * G + g;
      for (int64_t i = 0; i < bm; ++i) {
        std::fill_n(out + ((tile.start + i) * pb.Hq + h) * D, D, scalar_t(0));
        lse[h * pb.Lq + tile.start + i] = -std::numeric_limits<lse_t>::infinity();
      }
    }
    return;
  }
  // [R, D] scaled query rows; row g * bm + i is head hk * G + g at position tile.start + i.
  const acc_t* q_rows = stacked_rows(pk.q_s, pk.lq, D, hk * G, G, tile.start, bm, ws.q.data());
  std::fill_n(ws.m.data(), R, -std::numeric_limits<acc_t>::infinity());
  std::fill_n(ws.l.data(), R, acc_t(0));
  std::fill_n(ws.acc.data(), R * D, acc_t(0));
  for (int64_t k0 = ka; k0 < kb; k0 += kKeyTile) {
    const int64_t bn = std::min(kKeyTile, kb - k0);
    const acc_t* v_rows = pk.v + (hk * pk.lk + k0) * D;  // [bn, D]
    times_transposed(R, bn, D, q_rows, pk.k, pk.k_t, pk.lk, pk.ld_t, hk, k0, ws.s.data(), kKeyTile);  // S: [R, bn]
    for (int64_t r = 0; r < R; ++r) {
      acc_t* s_row = ws.s.data() + r * kKeyTile;
      const acc_t m_new = std::max(ws.m[r], row_max(s_row, bn));
      const acc_t row_sum = exp_sub_sum(s_row, bn, m_new);
      if (ws.m[r] != m_new) {
        // exp(-inf) = 0 on the first tile, where l and acc are still zero.
        const acc_t alpha = std::exp(ws.m[r] - m_new);
        ws.l[r] *= alpha;
        scale_row(ws.acc.data() + r * D, D, alpha);
      }
      ws.l[r] += row_sum;
      ws.m[r] = m_new;
    }
    gemm_ab<acc_t>(R, D, bn, ws.s.data(), kKeyTile, v_rows, D, acc_t(1), ws.acc.data(), D);  // [R, D]
  }
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    for (int64_t i = 0; i < bm; ++i) {
      const int64_t r = g * bm + i, pos = tile.start + i;
      const acc_t inv_l = acc_t(1) / ws.l[r];
      const acc_t* p_acc = ws.acc.data() + r * D;
      scalar_t* p_out = out + (pos * pb.Hq + h) * D;
      for (int64_t d = 0; d < D; ++d) p_out[d] = static_cast<scalar_t>(p_acc[d] * inv_l);
      lse[h * pb.Lq + pos] = static_cast<lse_t>(ws.m[r] + std::log(ws.l[r]));
    }
  }
}

// out (Lq, Hq, D) and lse (Hq, Lq) of every position inside a segment (the caller fills the tail).
template <typename scalar_t, typename acc_t, typename lse_t>
void run_forward(const Problem<scalar_t, acc_t>& pb, const Packed<acc_t>& pk, scalar_t* out, lse_t* lse) {
  const std::vector<Tile> tiles = make_tiles(pb.q_offsets, pb.S, pb.query_tile);
  const int64_t n_tiles = static_cast<int64_t>(tiles.size());
  for_each_item(n_tiles * pb.Hkv, FwdWorkspace<acc_t>(pb.G * pb.query_tile, kKeyTile, pb.D),
                [&](int64_t item, FwdWorkspace<acc_t>& ws) {
                  forward_tile(pb, pk, tiles[item / pb.Hkv], item % pb.Hkv, ws, out, lse);
                });
}

std::tuple<at::Tensor, at::Tensor> segment_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& q_index_in,
                                                             const at::Tensor& q_offsets_in,
                                                             const at::Tensor& k_index_in,
                                                             const at::Tensor& k_offsets_in, double scale) {
  check_segment_attention_fwd_args(q, k, v, q_index_in, q_offsets_in, k_index_in, k_offsets_in, scale, at::kCPU);
  const at::Tensor q_index = q_index_in.contiguous(), q_offsets = q_offsets_in.contiguous();
  const at::Tensor k_index = k_index_in.contiguous(), k_offsets = k_offsets_in.contiguous();
  const int64_t Lq = q_index.numel(), Hq = q.size(1), D = q.size(2);
  at::Tensor out = empty_output({Lq, Hq, D}, q.options());
  at::Tensor lse = empty_output({Hq, Lq}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "moga_segment_attention_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto pb = make_problem<scalar_t, acc_t>(q, k, v, q_index, q_offsets, k_index, k_offsets, scale);
    const PackedStorage<scalar_t, acc_t> packed(pb, /*backward=*/false);
    run_forward(pb, packed.view(), out.data_ptr<scalar_t>(), lse.data_ptr<float>());
    const int64_t Lq_used = pb.q_offsets[pb.S];
    // Positions past the last segment: zero output, no keys.
    out.narrow(0, Lq_used, Lq - Lq_used).zero_();
    lse.narrow(1, Lq_used, Lq - Lq_used).fill_(-std::numeric_limits<float>::infinity());
  });
  return {out, lse};
}

// ------------------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------------------

template <typename acc_t>
struct BwdWorkspace {
  std::vector<acc_t> q, dout, lse, delta, p, dp, grad_a, grad_b;
  BwdWorkspace(int64_t rows, int64_t keys, int64_t D)
      : q(rows * D),
        dout(rows * D),
        lse(rows),
        delta(rows),
        p(rows * keys),
        dp(rows * keys),
        grad_a(std::max(rows, keys) * D),
        grad_b(keys * D) {}
};

// Inputs of the backward shared by both passes.
template <typename scalar_t, typename acc_t>
struct Backward {
  const Problem<scalar_t, acc_t>& pb;
  Packed<acc_t> pk;
  const acc_t* lse;    // (Hq, Lq)
  const acc_t* delta;  // (Hq, Lq): rowsum(dout * out)

  // The query-side rows of a query tile for kv head hk, stacked g-major: scaled q, dout (pointers), lse, delta.
  struct QueryRows {
    const acc_t *q, *dout;
    int64_t R;
  };
  QueryRows load_query_tile(const Tile& tile, int64_t hk, BwdWorkspace<acc_t>& ws) const {
    const int64_t D = pb.D, bm = tile.len, G = pb.G;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = hk * G + g;
      std::copy_n(lse + h * pb.Lq + tile.start, bm, ws.lse.data() + g * bm);
      std::copy_n(delta + h * pb.Lq + tile.start, bm, ws.delta.data() + g * bm);
    }
    return {stacked_rows(pk.q_s, pk.lq, D, hk * G, G, tile.start, bm, ws.q.data()),
            stacked_rows(pk.dout, pk.lq, D, hk * G, G, tile.start, bm, ws.dout.data()), G * bm};
  }

  // ws.p = P = exp(S - lse) and ws.dp = dP = dout V^T for R query rows and the bn keys of kv head hk at k0.
  void probabilities(const QueryRows& qr, int64_t hk, int64_t k0, int64_t bn, int64_t ld,
                     BwdWorkspace<acc_t>& ws) const {
    times_transposed(qr.R, bn, pb.D, qr.q, pk.k, pk.k_t, pk.lk, pk.ld_t, hk, k0, ws.p.data(), ld);  // [R, bn]
    for (int64_t r = 0; r < qr.R; ++r) exp_sub_sum(ws.p.data() + r * ld, bn, ws.lse[r]);
    times_transposed(qr.R, bn, pb.D, qr.dout, pk.v, pk.v_t, pk.lk, pk.ld_t, hk, k0, ws.dp.data(), ld);  // [R, bn]
  }

  // ws.p = dS = P * (dP - delta).
  void softmax_backward(int64_t R, int64_t bn, int64_t ld, BwdWorkspace<acc_t>& ws) const {
    for (int64_t r = 0; r < R; ++r) softmax_grad(ws.p.data() + r * ld, ws.dp.data() + r * ld, bn, ws.delta[r]);
  }

  // Pass 1: dK, dV of the key tile for kv head hk, over all query tiles of its segment and all G query heads.
  template <typename Store>
  void key_tile(const Tile& tile, int64_t hk, BwdWorkspace<acc_t>& ws, const Store& store) const {
    const int64_t D = pb.D, bn = tile.len;
    acc_t* dk = ws.grad_a.data();  // [bn, D]
    acc_t* dv = ws.grad_b.data();  // [bn, D]
    std::fill_n(dk, bn * D, acc_t(0));
    std::fill_n(dv, bn * D, acc_t(0));
    const int64_t qa = pb.q_offsets[tile.segment], qb = pb.q_offsets[tile.segment + 1];
    for (int64_t p0 = qa; p0 < qb; p0 += pb.query_tile) {
      const QueryRows qr = load_query_tile({tile.segment, p0, std::min(pb.query_tile, qb - p0)}, hk, ws);
      probabilities(qr, hk, tile.start, bn, kGradKeyTile, ws);
      gemm_atb<acc_t>(bn, D, qr.R, ws.p.data(), kGradKeyTile, qr.dout, D, acc_t(1), dv, D);  // dV += P^T dO
      softmax_backward(qr.R, bn, kGradKeyTile, ws);
      // dK += dS^T (scale q): the scale of S = scale * q k^T is already in the packed q.
      gemm_atb<acc_t>(bn, D, qr.R, ws.p.data(), kGradKeyTile, qr.q, D, acc_t(1), dk, D);
    }
    for (int64_t j = 0; j < bn; ++j) store(tile.start + j, hk, dk + j * D, dv + j * D);
  }

  // One-pass alternative to passes 1 + 2 for a whole (segment, kv head): the item owns every gradient row of its
  // segment and head group, so dQ accumulates in a per-item buffer and each P / dS tile is computed once (5 GEMMs
  // per tile pair instead of 7). Used when there are enough such items to keep every thread busy.
  // dq_buf holds the segment's dQ tile by tile: the query tile at p0 owns rows (p0 - qa) * G .. + G * bm.
  template <typename StoreKV, typename StoreQ>
  void whole_segment(int64_t s, int64_t hk, BwdWorkspace<acc_t>& ws, std::vector<acc_t>& dq_buf,
                     const StoreKV& store_kv, const StoreQ& store_q) const {
    const int64_t D = pb.D, G = pb.G;
    const int64_t qa = pb.q_offsets[s], qb = pb.q_offsets[s + 1], ka = pb.k_offsets[s], kb = pb.k_offsets[s + 1];
    if (qa == qb || ka == kb) return;  // all gradients of the segment are zero, as initialised
    dq_buf.assign((qb - qa) * G * D, acc_t(0));
    acc_t* dk = ws.grad_a.data();  // [bn, D]
    acc_t* dv = ws.grad_b.data();  // [bn, D]
    for (int64_t k0 = ka; k0 < kb; k0 += kGradKeyTile) {
      const int64_t bn = std::min(kGradKeyTile, kb - k0);
      std::fill_n(dk, bn * D, acc_t(0));
      std::fill_n(dv, bn * D, acc_t(0));
      const acc_t* k_rows = pk.k + (hk * pk.lk + k0) * D;
      for (int64_t p0 = qa; p0 < qb; p0 += pb.query_tile) {
        const QueryRows qr = load_query_tile({s, p0, std::min(pb.query_tile, qb - p0)}, hk, ws);
        probabilities(qr, hk, k0, bn, kGradKeyTile, ws);
        gemm_atb<acc_t>(bn, D, qr.R, ws.p.data(), kGradKeyTile, qr.dout, D, acc_t(1), dv, D);  // dV += P^T dO
        softmax_backward(qr.R, bn, kGradKeyTile, ws);
        gemm_atb<acc_t>(bn, D, qr.R, ws.p.data(), kGradKeyTile, qr.q, D, acc_t(1), dk, D);  // dK += dS^T (scale q)
        acc_t* dq = dq_buf.data() + (p0 - qa) * G * D;
        gemm_ab<acc_t>(qr.R, D, bn, ws.p.data(), kGradKeyTile, k_rows, D, acc_t(1), dq, D);  // dQ += dS K
      }
      for (int64_t j = 0; j < bn; ++j) store_kv(k0 + j, hk, dk + j * D, dv + j * D);
    }
    for (int64_t p0 = qa; p0 < qb; p0 += pb.query_tile) {
      const int64_t bm = std::min(pb.query_tile, qb - p0);
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t i = 0; i < bm; ++i) {
          acc_t* row = dq_buf.data() + ((p0 - qa) * G + g * bm + i) * D;
          scale_row(row, D, pb.scale);
          store_q(p0 + i, hk * G + g, row);
        }
      }
    }
  }

  // Pass 2: dQ of the query tile for the G query heads of kv head hk, over all key tiles of its segment.
  template <typename Store>
  void query_tile(const Tile& tile, int64_t hk, BwdWorkspace<acc_t>& ws, const Store& store) const {
    const int64_t D = pb.D, bm = tile.len;
    const QueryRows qr = load_query_tile(tile, hk, ws);
    acc_t* dq = ws.grad_a.data();  // [R, D]
    std::fill_n(dq, qr.R * D, acc_t(0));
    const int64_t ka = pb.k_offsets[tile.segment], kb = pb.k_offsets[tile.segment + 1];
    for (int64_t k0 = ka; k0 < kb; k0 += kKeyTile) {
      const int64_t bn = std::min(kKeyTile, kb - k0);
      const acc_t* k_rows = pk.k + (hk * pk.lk + k0) * D;
      probabilities(qr, hk, k0, bn, kKeyTile, ws);
      softmax_backward(qr.R, bn, kKeyTile, ws);
      gemm_ab<acc_t>(qr.R, D, bn, ws.p.data(), kKeyTile, k_rows, D, acc_t(1), dq, D);  // dQ += dS K
    }
    for (int64_t g = 0; g < pb.G; ++g) {
      for (int64_t i = 0; i < bm; ++i) {
        acc_t* row = dq + (g * bm + i) * D;
        scale_row(row, D, pb.scale);
        store(tile.start + i, hk * pb.G + g, row);
      }
    }
  }
};

// The one-pass backward parallelises over (segment, kv head) only: use it when those items are many (>= 4 per
// thread) and none of them holds more than 1 / (2 * threads) of the work, so dynamic scheduling balances them.
template <typename scalar_t, typename acc_t>
bool use_one_pass(const Problem<scalar_t, acc_t>& pb) {
  const int64_t threads = at::get_num_threads();
  int64_t items = 0;
  double total = 0, largest = 0;
  for (int64_t s = 0; s < pb.S; ++s) {
    const double work = double(pb.q_offsets[s + 1] - pb.q_offsets[s]) * double(pb.k_offsets[s + 1] - pb.k_offsets[s]);
    if (work == 0) continue;
    items += pb.Hkv;
    total += work * pb.Hkv;
    largest = std::max(largest, work);
  }
  return items >= 4 * threads && largest * 2 * threads <= total;
}

// Gradient storage in token space: either the (T, H, D) output directly (each token written at most once) or an
// acc_t per-position buffer (Lpos, H, D) that is summed into tokens afterwards.
template <typename scalar_t, typename acc_t>
struct GradTarget {
  at::Tensor grad;          // (T, H, D), dtype of the inputs, zero-initialised
  at::Tensor per_position;  // (L, H, D) acc_t when tokens repeat, else undefined
  scalar_t* p_grad;
  acc_t* p_per_position = nullptr;
  const int64_t* index;
  int64_t H, D;

  GradTarget(int64_t T, int64_t L, int64_t H_, int64_t D_, bool unique, const at::Tensor& index_t,
             const at::TensorOptions& options)
      : index(index_t.const_data_ptr<int64_t>()), H(H_), D(D_) {
    grad = empty_output({T, H, D}, options);
    grad.zero_();  // tokens no segment reads get zero
    p_grad = grad.data_ptr<scalar_t>();
    if (!unique) {
      per_position = at::zeros({L, H, D}, options.dtype(c10::CppTypeToScalarType<acc_t>::value));
      p_per_position = per_position.data_ptr<acc_t>();
    }
  }

  void store(int64_t pos, int64_t h, const acc_t* row) const {
    if (p_per_position != nullptr) {
      std::copy_n(row, D, p_per_position + (pos * H + h) * D);
    } else {
      scalar_t* p = p_grad + (index[pos] * H + h) * D;
      for (int64_t d = 0; d < D; ++d) p[d] = static_cast<scalar_t>(row[d]);
    }
  }

  // Sum per-position rows of positions [0, used) into their tokens (index_add_ is race-free and deterministic).
  at::Tensor finish(const at::Tensor& index_t, int64_t used) {
    if (!per_position.defined()) return grad;
    at::Tensor acc = at::zeros({grad.size(0), H, D}, per_position.options());
    acc.index_add_(0, index_t.narrow(0, 0, used), per_position.narrow(0, 0, used));
    grad.copy_(acc);
    return grad;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> segment_attention_bwd_cpu(
    const at::Tensor& dout_in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse_in, const at::Tensor& q_index_in, const at::Tensor& q_offsets_in,
    const at::Tensor& k_index_in, const at::Tensor& k_offsets_in, double scale, bool q_unique, bool k_unique) {
  check_segment_attention_bwd_args(dout_in, q, k, v, out, lse_in, q_index_in, q_offsets_in, k_index_in,
                                   k_offsets_in, scale, at::kCPU);
  const at::Tensor q_index = q_index_in.contiguous(), q_offsets = q_offsets_in.contiguous();
  const at::Tensor k_index = k_index_in.contiguous(), k_offsets = k_offsets_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const int64_t Lq = q_index.numel(), Lk = k_index.numel(), Hq = q.size(1), Hkv = k.size(1), D = q.size(2);
  at::Tensor dq, dk, dv;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "moga_segment_attention_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const auto pb = make_problem<scalar_t, acc_t>(q, k, v, q_index, q_offsets, k_index, k_offsets, scale);
    // delta[h, pos] = sum_d dout * out, in acc_t: (Hq, Lq).
    const at::Tensor delta = (dout_in.to(acc_dtype) * out.to(acc_dtype)).sum(-1).t().contiguous();
    const PackedStorage<scalar_t, acc_t> packed(pb, /*backward=*/true);
    const at::Tensor dout_p = pack(rows_of<scalar_t>(dout_in), nullptr, pb.q_offsets[pb.S], Hq, D, acc_t(1));
    const Packed<acc_t> pk = packed.view(dout_p.const_data_ptr<acc_t>());
    // The op's lse is float32; for fp64 inputs P = exp(S - lse) would then carry float32 error, so recompute
    // lse in double (one extra pass of QK^T, fp64 only).
    at::Tensor lse_acc = lse;
    if constexpr (std::is_same_v<acc_t, double>) {
      lse_acc = at::empty({Hq, Lq}, q.options().dtype(at::kDouble));
      at::Tensor scratch_out = at::empty({Lq, Hq, D}, q.options());
      run_forward(pb, pk, scratch_out.data_ptr<scalar_t>(), lse_acc.data_ptr<acc_t>());
    }
    const Backward<scalar_t, acc_t> bw{pb, pk, lse_acc.const_data_ptr<acc_t>(), delta.const_data_ptr<acc_t>()};
    GradTarget<scalar_t, acc_t> gq(q.size(0), Lq, Hq, D, q_unique, q_index, q.options());
    GradTarget<scalar_t, acc_t> gk(k.size(0), Lk, Hkv, D, k_unique, k_index, k.options());
    GradTarget<scalar_t, acc_t> gv(v.size(0), Lk, Hkv, D, k_unique, k_index, v.options());
    const BwdWorkspace<acc_t> prototype(pb.G * pb.query_tile, std::max(kKeyTile, kGradKeyTile), D);

    auto store_kv = [&](int64_t pos, int64_t hk, const acc_t* dk_row, const acc_t* dv_row) {
      gk.store(pos, hk, dk_row);
      gv.store(pos, hk, dv_row);
    };
    auto store_q = [&](int64_t pos, int64_t h, const acc_t* row) { gq.store(pos, h, row); };
    if (use_one_pass(pb)) {
      std::vector<int64_t> segments;  // non-empty ones
      for (int64_t s = 0; s < pb.S; ++s) {
        if (pb.q_offsets[s + 1] > pb.q_offsets[s] && pb.k_offsets[s + 1] > pb.k_offsets[s]) segments.push_back(s);
      }
      struct OnePassWorkspace {
        BwdWorkspace<acc_t> tiles;
        std::vector<acc_t> dq;
      };
      for_each_item(static_cast<int64_t>(segments.size()) * Hkv, OnePassWorkspace{prototype, {}},
                    [&](int64_t item, OnePassWorkspace& ws) {
                      bw.whole_segment(segments[item / Hkv], item % Hkv, ws.tiles, ws.dq, store_kv, store_q);
                    });
    } else {
      const std::vector<Tile> key_tiles = make_tiles(pb.k_offsets, pb.S, kGradKeyTile);
      for_each_item(static_cast<int64_t>(key_tiles.size()) * Hkv, prototype,
                    [&](int64_t item, BwdWorkspace<acc_t>& ws) {
                      bw.key_tile(key_tiles[item / Hkv], item % Hkv, ws, store_kv);
                    });
      const std::vector<Tile> query_tiles = make_tiles(pb.q_offsets, pb.S, pb.query_tile);
      for_each_item(static_cast<int64_t>(query_tiles.size()) * Hkv, prototype,
                    [&](int64_t item, BwdWorkspace<acc_t>& ws) {
                      bw.query_tile(query_tiles[item / Hkv], item % Hkv, ws, store_q);
                    });
    }
    dq = gq.finish(q_index, pb.q_offsets[pb.S]);
    dk = gk.finish(k_index, pb.k_offsets[pb.S]);
    dv = gv.finish(k_index, pb.k_offsets[pb.S]);
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace moga::cpu

TORCH_LIBRARY_IMPL(moga, CPU, m) {
  m.impl("segment_attention_fwd", &moga::cpu::segment_attention_fwd_cpu);
  m.impl("segment_attention_bwd", &moga::cpu::segment_attention_bwd_cpu);
}
