// Shared, torch-facing helpers of the moga::* operators: argument checks and output allocation.
// Defined in csrc/ops.cpp; used by the CPU (csrc/cpu) and CUDA (csrc/cuda/cuda_ops.cpp) implementations so that
// both reject the same bad inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/ArrayRef.h>

namespace moga {

// True while Python's moga._alloc.poisoned_outputs() is active (set through moga._C._set_poison_outputs):
// then empty_output() fills floating-point buffers with NaN so tests can prove every element was written.
bool poison_outputs();

// at::empty(sizes, options), NaN-filled when poison_outputs(). Use for every op output and gradient.
at::Tensor empty_output(c10::IntArrayRef sizes, const at::TensorOptions& options);

// Metadata-only checks (shapes, dtypes, devices, strides); never reads tensor contents, so never synchronises.
// `device` is the device type the calling implementation runs on.
void check_sort_by_segment_args(const at::Tensor& keys, int64_t num_segments, c10::DeviceType device);

void check_segment_attention_fwd_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& q_index, const at::Tensor& q_offsets,
                                      const at::Tensor& k_index, const at::Tensor& k_offsets, double scale,
                                      c10::DeviceType device);

void check_segment_attention_bwd_args(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                      const at::Tensor& q_index, const at::Tensor& q_offsets,
                                      const at::Tensor& k_index, const at::Tensor& k_offsets, double scale,
                                      c10::DeviceType device);

// out_seg (L, H, D) float16/bfloat16/float32/float64 with a contiguous last dim, position (L,) int64,
// gates (T, K) floating with T * K == L, all on `device`.
void check_gated_unpermute_args(const at::Tensor& out_seg, const at::Tensor& position, const at::Tensor& gates,
                                c10::DeviceType device);

// The above plus dout (T, H, D) in out_seg's dtype.
void check_gated_unpermute_bwd_args(const at::Tensor& dout, const at::Tensor& out_seg, const at::Tensor& position,
                                    const at::Tensor& gates, c10::DeviceType device);

}  // namespace moga
