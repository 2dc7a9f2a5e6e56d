// CPU gated un-permute: moga::gated_unpermute and moga::gated_unpermute_bwd for CPU tensors.
//
// MoGA's last step: token t's output is the gate-weighted sum of its top_k rows of the segment-order attention
// output,
//   out[t] = sum_j gates[t, j] * out_seg[position[t * K + j]]          (t < T, j < K, rows of H * D values),
// and its backward
//   d_out_seg[position[t * K + j]] = gates[t, j] * dout[t],    d_gates[t, j] = <dout[t], out_seg[position[t * K + j]]>.
// position is a permutation of [0, T * K) (checked here: the CPU can read it for free), so every d_out_seg row has
// exactly one writer. Products and sums run in acc_t (float32; float64 for float64 out_seg), one pass over the
// rows, parallel over tokens; no (T, K, H, D) temporary exists.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../ops.h"

namespace moga::cpu {
namespace {

constexpr int64_t kTokensPerTask = 16;

// position must hold every row of [0, L) exactly once.
void check_permutation(const at::Tensor& position) {
  const int64_t L = position.numel();
  const int64_t* p = position.const_data_ptr<int64_t>();
  std::vector<char> seen(L, 0);
  for (int64_t i = 0; i < L; ++i) {
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < L, "moga: position[", i, "] = ", p[i], " is not a row of out_seg [0, ", L,
                      ")");
    TORCH_CHECK_VALUE(!seen[p[i]], "moga: position must be a permutation, row ", p[i], " occurs twice");
    seen[p[i]] = 1;
  }
}

at::Tensor gated_unpermute_cpu(const at::Tensor& out_seg_in, const at::Tensor& position_in,
                               const at::Tensor& gates_in) {
  check_gated_unpermute_args(out_seg_in, position_in, gates_in, at::kCPU);
  const at::Tensor out_seg = out_seg_in.contiguous(), position = position_in.contiguous();
  check_permutation(position);
  const int64_t T = gates_in.size(0), K = gates_in.size(1), H = out_seg.size(1), D = out_seg.size(2), E = H * D;
  at::Tensor out = empty_output({T, H, D}, out_seg.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_seg.scalar_type(), "moga_gated_unpermute_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor gates = gates_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const scalar_t* p_seg = out_seg.const_data_ptr<scalar_t>();
    const int64_t* p_pos = position.const_data_ptr<int64_t>();
    const acc_t* p_gates = gates.const_data_ptr<acc_t>();
    scalar_t* p_out = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, kTokensPerTask, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> acc(E);  // [H * D]
      for (int64_t t = t0; t < t1; ++t) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = 0; j < K; ++j) {
          const acc_t g = p_gates[t * K + j];
          const scalar_t* row = p_seg + p_pos[t * K + j] * E;
          for (int64_t e = 0; e < E; ++e) acc[e] += g * static_cast<acc_t>(row[e]);
        }
        for (int64_t e = 0; e < E; ++e) p_out[t * E + e] = static_cast<scalar_t>(acc[e]);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_unpermute_bwd_cpu(const at::Tensor& dout_in, const at::Tensor& out_seg_in,
                                                           const at::Tensor& position_in,
                                                           const at::Tensor& gates_in) {
  check_gated_unpermute_bwd_args(dout_in, out_seg_in, position_in, gates_in, at::kCPU);
  const at::Tensor dout = dout_in.contiguous(), out_seg = out_seg_in.contiguous(), position = position_in.contiguous();
  check_permutation(position);
  const int64_t T = gates_in.size(0), K = gates_in.size(1), E = out_seg.size(1) * out_seg.size(2);
  at::Tensor d_seg = empty_output(out_seg.sizes(), out_seg.options());
  at::Tensor d_gates;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_seg.scalar_type(), "moga_gated_unpermute_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor gates = gates_in.to(acc_dtype).contiguous();
    at::Tensor d_gates_acc = empty_output({T, K}, gates.options());
    const scalar_t* p_dout = dout.const_data_ptr<scalar_t>();
    const scalar_t* p_seg = out_seg.const_data_ptr<scalar_t>();
    const int64_t* p_pos = position.const_data_ptr<int64_t>();
    const acc_t* p_gates = gates.const_data_ptr<acc_t>();
    scalar_t* p_d_seg = d_seg.data_ptr<scalar_t>();
    acc_t* p_d_gates = d_gates_acc.data_ptr<acc_t>();
    at::parallel_for(0, T, kTokensPerTask, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> grad(E);  // [H * D]: dout[t] in acc_t
      for (int64_t t = t0; t < t1; ++t) {
        for (int64_t e = 0; e < E; ++e) grad[e] = static_cast<acc_t>(p_dout[t * E + e]);
        for (int64_t j = 0; j < K; ++j) {
          const int64_t row = p_pos[t * K + j];
          const acc_t g = p_gates[t * K + j];
          const scalar_t* seg_row = p_seg + row * E;
          scalar_t* d_row = p_d_seg + row * E;
          acc_t dot = 0;
          for (int64_t e = 0; e < E; ++e) {
            d_row[e] = static_cast<scalar_t>(g * grad[e]);
            dot += grad[e] * static_cast<acc_t>(seg_row[e]);
          }
          p_d_gates[t * K + j] = dot;
        }
      }
    });
    d_gates = d_gates_acc.to(gates_in.scalar_type());
  });
  return {d_seg, d_gates};
}

}  // namespace
}  // namespace moga::cpu

TORCH_LIBRARY_IMPL(moga, CPU, m) {
  m.impl("gated_unpermute", &moga::cpu::gated_unpermute_cpu);
  m.impl("gated_unpermute_bwd", &moga::cpu::gated_unpermute_bwd_cpu);
}
