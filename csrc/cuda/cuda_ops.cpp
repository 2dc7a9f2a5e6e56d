// CUDA implementations of the moga::* operators: argument checks, allocation, the current stream, and launches
// through the torch-free launchers of moga_cuda.h. The only file of csrc/cuda that includes torch headers.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "moga_cuda.h"
#include "ops.h"

namespace moga {
namespace {

constexpr auto kCUDA = c10::DeviceType::CUDA;

// cp.async copies 16-byte row chunks: row starts must be 16-byte aligned. A view that is not (odd strides or a
// misaligned storage offset) is copied once into a fresh contiguous tensor; the values are unchanged.
at::Tensor rows_16b_aligned(const at::Tensor& t) {
  const bool aligned = t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
                       reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  return aligned ? t : t.clone(at::MemoryFormat::Contiguous);
}

void check_kernel_support(const at::Tensor& q, std::initializer_list<const at::Tensor*> same_device) {
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "moga: the CUDA segment attention kernels take float16 or bfloat16 q/k/v, got ", q.scalar_type(),
              " (the triton backend runs float32 on the GPU)");
  TORCH_CHECK(q.size(2) == 64 || q.size(2) == 128, "moga: the CUDA segment attention kernels support head dim 64 or "
              "128, got q of shape ", q.sizes());
  TORCH_CHECK(q.size(1) <= 65535, "moga: at most 65535 query heads, got q of shape ", q.sizes());
  for (const at::Tensor* t : same_device) {
    TORCH_CHECK(t->device() == q.device(), "moga: all tensors must be on q's device ", q.device(), ", got one on ",
                t->device());
  }
}

moga_cuda::SegmentAttentionArgs make_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const at::Tensor& q_index, const at::Tensor& q_offsets,
                                          const at::Tensor& k_index, const at::Tensor& k_offsets, double scale) {
  moga_cuda::SegmentAttentionArgs a{};
  a.dtype = q.scalar_type() == at::kHalf ? moga_cuda::DType::kHalf : moga_cuda::DType::kBFloat16;
  a.head_dim = static_cast<int>(q.size(2));
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.q_stride_t = q.stride(0);
  a.q_stride_h = q.stride(1);
  a.k_stride_t = k.stride(0);
  a.k_stride_h = k.stride(1);
  a.v_stride_t = v.stride(0);
  a.v_stride_h = v.stride(1);
  a.q_tokens = q.size(0);
  a.kv_tokens = k.size(0);
  a.Hq = q.size(1);
  a.Hkv = k.size(1);
  a.q_index = q_index.data_ptr<int64_t>();
  a.q_offsets = q_offsets.data_ptr<int64_t>();
  a.k_index = k_index.data_ptr<int64_t>();
  a.k_offsets = k_offsets.data_ptr<int64_t>();
  a.Lq = q_index.numel();
  a.Lk = k_index.numel();
  a.S = q_offsets.numel() - 1;
  a.scale = static_cast<float>(scale);
  return a;
}

std::tuple<at::Tensor, at::Tensor> sort_by_segment_cuda(const at::Tensor& keys, int64_t num_segments) {
  check_sort_by_segment_args(keys, num_segments, kCUDA);
  const c10::cuda::CUDAGuard guard(keys.device());
  const at::Tensor k = keys.contiguous();
  const int64_t L = k.numel();
  at::Tensor order = empty_output({L}, k.options());
  at::Tensor offsets = empty_output({num_segments + 1}, k.options());
  at::Tensor workspace = at::empty({moga_cuda::sort_workspace_elems(L, num_segments)}, k.options());
  C10_CUDA_CHECK(moga_cuda::sort_by_segment(k.data_ptr<int64_t>(), L, num_segments, order.data_ptr<int64_t>(),
                                            offsets.data_ptr<int64_t>(), workspace.data_ptr<int64_t>(),
                                            at::cuda::getCurrentCUDAStream()));
  return {order, offsets};
}

std::tuple<at::Tensor, at::Tensor> segment_attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                              const at::Tensor& v_in, const at::Tensor& q_index_in,
                                                              const at::Tensor& q_offsets_in,
                                                              const at::Tensor& k_index_in,
                                                              const at::Tensor& k_offsets_in, double scale) {
  check_segment_attention_fwd_args(q_in, k_in, v_in, q_index_in, q_offsets_in, k_index_in, k_offsets_in, scale, kCUDA);
  check_kernel_support(q_in, {&k_in, &v_in, &q_index_in, &q_offsets_in, &k_index_in, &k_offsets_in});
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = rows_16b_aligned(q_in), k = rows_16b_aligned(k_in), v = rows_16b_aligned(v_in);
  const at::Tensor q_index = q_index_in.contiguous(), q_offsets = q_offsets_in.contiguous();
  const at::Tensor k_index = k_index_in.contiguous(), k_offsets = k_offsets_in.contiguous();
  const auto a = make_args(q, k, v, q_index, q_offsets, k_index, k_offsets, scale);

  at::Tensor out = empty_output({a.Lq, a.Hq, a.head_dim}, q.options());
  at::Tensor lse = empty_output({a.Hq, a.Lq}, q.options().dtype(at::kFloat));
  at::Tensor workspace = at::empty({moga_cuda::fwd_workspace_elems(a)}, q_index.options());
  C10_CUDA_CHECK(moga_cuda::segment_attention_fwd(a, out.data_ptr(), lse.data_ptr<float>(),
                                                  workspace.data_ptr<int64_t>(), at::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> segment_attention_bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& q_index_in, const at::Tensor& q_offsets_in,
    const at::Tensor& k_index_in, const at::Tensor& k_offsets_in, double scale, bool q_unique, bool k_unique) {
  check_segment_attention_bwd_args(dout_in, q_in, k_in, v_in, out_in, lse_in, q_index_in, q_offsets_in, k_index_in,
                                   k_offsets_in, scale, kCUDA);
  check_kernel_support(q_in, {&k_in, &v_in, &q_index_in, &q_offsets_in, &k_index_in, &k_offsets_in, &dout_in,
                              &out_in, &lse_in});
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = rows_16b_aligned(q_in), k = rows_16b_aligned(k_in), v = rows_16b_aligned(v_in);
  // dout and out are read as dense (Lq, Hq, D) rows; lse and delta as dense (Hq, Lq). dout rows are copied with
  // cp.async like q/k/v, so a contiguous dout at a misaligned storage offset must be copied too.
  const at::Tensor dout = rows_16b_aligned(dout_in.contiguous());
  const at::Tensor out = out_in.contiguous(), lse = lse_in.contiguous();
  const at::Tensor q_index = q_index_in.contiguous(), q_offsets = q_offsets_in.contiguous();
  const at::Tensor k_index = k_index_in.contiguous(), k_offsets = k_offsets_in.contiguous();
  const auto a = make_args(q, k, v, q_index, q_offsets, k_index, k_offsets, scale);

  const int64_t D = a.head_dim;
  at::Tensor dq = empty_output({a.q_tokens, a.Hq, D}, q.options());
  at::Tensor dk = empty_output({a.kv_tokens, a.Hkv, D}, k.options());
  at::Tensor dv = empty_output({a.kv_tokens, a.Hkv, D}, v.options());
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor delta = at::empty({a.Hq, a.Lq}, f32);
  // fp32 accumulators only where a token row can be reached more than once.
  at::Tensor dq_accum = q_unique ? at::Tensor() : at::empty({a.q_tokens, a.Hq, D}, f32);
  at::Tensor dk_accum = k_unique ? at::Tensor() : at::empty({a.kv_tokens, a.Hkv, D}, f32);
  at::Tensor dv_accum = k_unique ? at::Tensor() : at::empty({a.kv_tokens, a.Hkv, D}, f32);
  at::Tensor workspace = at::empty({moga_cuda::bwd_workspace_elems(a)}, q_index.options());

  moga_cuda::SegmentAttentionGrads g{};
  g.dout = dout.data_ptr();
  g.out = out.data_ptr();
  g.lse = lse.data_ptr<float>();
  g.delta = delta.data_ptr<float>();
  g.dq = dq.data_ptr();
  g.dk = dk.data_ptr();
  g.dv = dv.data_ptr();
  g.dq_accum = q_unique ? nullptr : dq_accum.data_ptr<float>();
  g.dk_accum = k_unique ? nullptr : dk_accum.data_ptr<float>();
  g.dv_accum = k_unique ? nullptr : dv_accum.data_ptr<float>();
  g.q_unique = q_unique;
  g.k_unique = k_unique;
  C10_CUDA_CHECK(moga_cuda::segment_attention_bwd(a, g, workspace.data_ptr<int64_t>(),
                                                  at::cuda::getCurrentCUDAStream()));
  return {dq, dk, dv};
}

moga_cuda::GateDType gate_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return moga_cuda::GateDType::kHalf;
    case at::kBFloat16: return moga_cuda::GateDType::kBFloat16;
    case at::kDouble: return moga_cuda::GateDType::kDouble;
    default: return moga_cuda::GateDType::kFloat;  // check_float_tensor admits only these four
  }
}

// Gates in the kernels' accumulation type: float64 for float64 rows, else float32 (a (T, K) tensor, tiny).
at::Tensor gates_in_acc(const at::Tensor& out_seg, const at::Tensor& gates) {
  return gates.to(out_seg.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

// Row indices out of [0, L) would read or write outside out_seg: checked on the device, without a host sync (a
// repeated index stays in bounds; the CPU op also rejects those).
void assert_rows_in_range(const at::Tensor& position) {
  at::_assert_async(((position >= 0) & (position < position.numel())).all(),
                    "moga: position must hold rows of out_seg in [0, T * K)");
}

at::Tensor gated_unpermute_cuda(const at::Tensor& out_seg_in, const at::Tensor& position_in,
                                const at::Tensor& gates_in) {
  check_gated_unpermute_args(out_seg_in, position_in, gates_in, kCUDA);
  const c10::cuda::CUDAGuard guard(out_seg_in.device());
  const at::Tensor out_seg = out_seg_in.contiguous(), position = position_in.contiguous();
  const at::Tensor gates = gates_in_acc(out_seg, gates_in);
  assert_rows_in_range(position);
  const int64_t T = gates.size(0), K = gates.size(1), E = out_seg.size(1) * out_seg.size(2);
  at::Tensor out = empty_output({T, out_seg.size(1), out_seg.size(2)}, out_seg.options());
  C10_CUDA_CHECK(moga_cuda::gated_unpermute_fwd(gate_dtype(out_seg), out_seg.data_ptr(), position.data_ptr<int64_t>(),
                                                gates.data_ptr(), T, K, E, out.data_ptr(),
                                                at::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_unpermute_bwd_cuda(const at::Tensor& dout_in, const at::Tensor& out_seg_in,
                                                            const at::Tensor& position_in,
                                                            const at::Tensor& gates_in) {
  check_gated_unpermute_bwd_args(dout_in, out_seg_in, position_in, gates_in, kCUDA);
  const c10::cuda::CUDAGuard guard(out_seg_in.device());
  const at::Tensor dout = dout_in.contiguous(), out_seg = out_seg_in.contiguous();
  const at::Tensor position = position_in.contiguous(), gates = gates_in_acc(out_seg, gates_in);
  assert_rows_in_range(position);
  const int64_t T = gates.size(0), K = gates.size(1), E = out_seg.size(1) * out_seg.size(2);
  at::Tensor d_seg = empty_output(out_seg.sizes(), out_seg.options());
  at::Tensor d_gates = empty_output({T, K}, gates.options());
  C10_CUDA_CHECK(moga_cuda::gated_unpermute_bwd(gate_dtype(out_seg), dout.data_ptr(), out_seg.data_ptr(),
                                                position.data_ptr<int64_t>(), gates.data_ptr(), T, K, E,
                                                d_seg.data_ptr(), d_gates.data_ptr(),
                                                at::cuda::getCurrentCUDAStream()));
  return {d_seg, d_gates.to(gates_in.scalar_type())};
}

}  // namespace
}  // namespace moga

TORCH_LIBRARY_IMPL(moga, CUDA, m) {
  m.impl("sort_by_segment", &moga::sort_by_segment_cuda);
  m.impl("segment_attention_fwd", &moga::segment_attention_fwd_cuda);
  m.impl("segment_attention_bwd", &moga::segment_attention_bwd_cuda);
  m.impl("gated_unpermute", &moga::gated_unpermute_cuda);
  m.impl("gated_unpermute_bwd", &moga::gated_unpermute_bwd_cuda);
}
