// The moga operator library: schema definitions (the only TORCH_LIBRARY(moga, m) block), the shared argument
// checks and output allocation of csrc/ops.h, and the Python module moga._C (loading it registers the ops).
// Bad arguments raise c10::TypeError (dtype) or c10::ValueError (anything else): TypeError / ValueError in
// Python. Device implementations register with TORCH_LIBRARY_IMPL(moga, CPU / CUDA, m) in csrc/cpu and csrc/cuda.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <string>

#include "cpu/gemm_f32.h"
#include "ops.h"

namespace moga {
namespace {

std::atomic<bool> g_poison{false};

void check_index_tensor(const at::Tensor& t, const char* name, c10::DeviceType device) {
  TORCH_CHECK_VALUE(t.dim() == 1, "moga: ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, "moga: ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().type() == device, "moga: ", name, " must be on ", device, ", got ", t.device());
}

void check_float_tensor(const at::Tensor& t, const char* name, c10::DeviceType device) {
  TORCH_CHECK_VALUE(t.dim() == 3, "moga: ", name, " must have shape (tokens, heads, headdim), got ", t.sizes());
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, "moga: ", name,
              " must be float16, bfloat16, float32 or float64, got ", st);
  TORCH_CHECK_VALUE(t.device().type() == device, "moga: ", name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK_VALUE(t.size(2) == 0 || t.stride(2) == 1, "moga: ", name,
              " must have a contiguous last dimension (stride 1), got strides ", t.strides());
}

}  // namespace

bool poison_outputs() { return g_poison.load(std::memory_order_relaxed); }

at::Tensor empty_output(c10::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (poison_outputs() && at::isFloatingType(t.scalar_type())) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

void check_sort_by_segment_args(const at::Tensor& keys, int64_t num_segments, c10::DeviceType device) {
  check_index_tensor(keys, "keys", device);
  TORCH_CHECK_VALUE(num_segments >= 0, "moga: num_segments must be >= 0, got ", num_segments);
}

void check_segment_attention_fwd_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& q_index, const at::Tensor& q_offsets,
                                      const at::Tensor& k_index, const at::Tensor& k_offsets, double scale,
                                      c10::DeviceType device) {
  check_float_tensor(q, "q", device);
  check_float_tensor(k, "k", device);
  check_float_tensor(v, "v", device);
  TORCH_CHECK_TYPE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "moga: q, k, v must share a dtype, got q ", q.scalar_type(), ", k ", k.scalar_type(), ", v ",
              v.scalar_type());
  TORCH_CHECK_VALUE(q.device() == k.device() && q.device() == v.device(), "moga: q, k, v must be on one device, got q ",
              q.device(), ", k ", k.device(), ", v ", v.device());
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "moga: k and v must have the same shape, got k ", k.sizes(), " and v ",
              v.sizes());
  TORCH_CHECK_VALUE(q.size(2) == k.size(2), "moga: q and k must have the same headdim, got q ", q.sizes(), " and k ",
              k.sizes());
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "moga: q heads (", q.size(1),
              ") must be a positive multiple of k/v heads (", k.size(1), ")");
  check_index_tensor(q_index, "q_index", device);
  check_index_tensor(q_offsets, "q_offsets", device);
  check_index_tensor(k_index, "k_index", device);
  check_index_tensor(k_offsets, "k_offsets", device);
  TORCH_CHECK_VALUE(q_offsets.numel() >= 1, "moga: q_offsets must have S + 1 >= 1 entries, got shape ",
              q_offsets.sizes());
  TORCH_CHECK_VALUE(q_offsets.numel() == k_offsets.numel(), "moga: q_offsets and k_offsets must both have S + 1 entries, got ",
              q_offsets.sizes(), " and ", k_offsets.sizes());
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, "moga: scale must be a positive finite number, got ", scale);
}

void check_segment_attention_bwd_args(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                      const at::Tensor& q_index, const at::Tensor& q_offsets,
                                      const at::Tensor& k_index, const at::Tensor& k_offsets, double scale,
                                      c10::DeviceType device) {
  check_segment_attention_fwd_args(q, k, v, q_index, q_offsets, k_index, k_offsets, scale, device);
  const int64_t Lq = q_index.numel(), Hq = q.size(1), D = q.size(2);
  check_float_tensor(dout, "dout", device);
  check_float_tensor(out, "out", device);
  TORCH_CHECK_VALUE(dout.sizes() == c10::IntArrayRef({Lq, Hq, D}), "moga: dout must have shape (Lq, Hq, D) = (", Lq, ", ",
              Hq, ", ", D, "), got ", dout.sizes());
  TORCH_CHECK_VALUE(out.sizes() == dout.sizes(), "moga: out must have shape (Lq, Hq, D) = (", Lq, ", ", Hq, ", ", D,
              "), got ", out.sizes());
  TORCH_CHECK_TYPE(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "moga: dout and out must have the dtype of q (", q.scalar_type(), "), got dout ", dout.scalar_type(),
              " and out ", out.scalar_type());
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, "moga: lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.device().type() == device, "moga: lse must be on ", device, ", got ", lse.device());
  TORCH_CHECK_VALUE(lse.sizes() == c10::IntArrayRef({Hq, Lq}), "moga: lse must have shape (Hq, Lq) = (", Hq, ", ", Lq,
              "), got ", lse.sizes());
}

void check_gated_unpermute_args(const at::Tensor& out_seg, const at::Tensor& position, const at::Tensor& gates,
                                c10::DeviceType device) {
  check_float_tensor(out_seg, "out_seg", device);
  check_index_tensor(position, "position", device);
  TORCH_CHECK_VALUE(gates.dim() == 2, "moga: gates must have shape (tokens, top_k), got ", gates.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(gates.scalar_type()), "moga: gates must be floating point, got ",
                   gates.scalar_type());
  TORCH_CHECK_VALUE(gates.device() == out_seg.device() && position.device() == out_seg.device(),
                    "moga: out_seg, position and gates must be on one device, got ", out_seg.device(), ", ",
                    position.device(), " and ", gates.device());
  TORCH_CHECK_VALUE(position.numel() == gates.numel() && out_seg.size(0) == position.numel(), "moga: out_seg (",
                    out_seg.sizes(), ") needs one row per entry of gates (", gates.sizes(), ") and of position (",
                    position.sizes(), ")");
}

void check_gated_unpermute_bwd_args(const at::Tensor& dout, const at::Tensor& out_seg, const at::Tensor& position,
                                    const at::Tensor& gates, c10::DeviceType device) {
  check_gated_unpermute_args(out_seg, position, gates, device);
  check_float_tensor(dout, "dout", device);
  TORCH_CHECK_TYPE(dout.scalar_type() == out_seg.scalar_type(), "moga: dout must have the dtype of out_seg (",
                   out_seg.scalar_type(), "), got ", dout.scalar_type());
  TORCH_CHECK_VALUE(dout.size(0) == gates.size(0) && dout.size(1) == out_seg.size(1) &&
                        dout.size(2) == out_seg.size(2),
                    "moga: dout must have shape (T, H, D) = (", gates.size(0), ", ", out_seg.size(1), ", ",
                    out_seg.size(2), "), got ", dout.sizes());
  TORCH_CHECK_VALUE(dout.device() == out_seg.device(), "moga: dout must be on ", out_seg.device(), ", got ",
                    dout.device());
}

}  // namespace moga

TORCH_LIBRARY(moga, m) {
  m.def("sort_by_segment(Tensor keys, int num_segments) -> (Tensor order, Tensor offsets)");
  m.def(
      "segment_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor q_index, Tensor q_offsets, Tensor k_index, "
      "Tensor k_offsets, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "segment_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor q_index, "
      "Tensor q_offsets, Tensor k_index, Tensor k_offsets, float scale, bool q_unique, bool k_unique) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
  m.def("gated_unpermute(Tensor out_seg, Tensor position, Tensor gates) -> Tensor");
  m.def(
      "gated_unpermute_bwd(Tensor dout, Tensor out_seg, Tensor position, Tensor gates) "
      "-> (Tensor d_out_seg, Tensor d_gates)");
}

// ---- Python module moga._C: importing it runs the registrations above. -------------------------------------------

namespace {

// _set_poison_outputs(enable: bool) -> bool (the previous setting).
PyObject* set_poison_outputs(PyObject* /*self*/, PyObject* arg) {
  const int enable = PyObject_IsTrue(arg);
  if (enable < 0) return nullptr;
  const bool previous = moga::g_poison.exchange(enable != 0);
  return PyBool_FromLong(previous ? 1 : 0);
}

const char* gemm_impl_name(moga::cpu::GemmImpl impl) {
  switch (impl) {
    case moga::cpu::GemmImpl::kAvx512: return "avx512";
    case moga::cpu::GemmImpl::kBlas: return "blas";
    default: return "auto";
  }
}

// _set_cpu_gemm(name: str) -> str (the previous setting): which GEMM the CPU attention uses for float products,
// "auto" (AVX-512 kernel where the CPU has it, else BLAS), "avx512" or "blas".
PyObject* set_cpu_gemm(PyObject* /*self*/, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  const std::string s(name);
  moga::cpu::GemmImpl impl;
  if (s == "auto") {
    impl = moga::cpu::GemmImpl::kAuto;
  } else if (s == "avx512") {
    impl = moga::cpu::GemmImpl::kAvx512;
  } else if (s == "blas") {
    impl = moga::cpu::GemmImpl::kBlas;
  } else {
    PyErr_Format(PyExc_ValueError, "moga: cpu gemm must be 'auto', 'avx512' or 'blas', got '%s'", name);
    return nullptr;
  }
  const moga::cpu::GemmImpl previous = moga::cpu::gemm_impl();
  if (!moga::cpu::set_gemm_impl(impl)) {
    PyErr_SetString(PyExc_ValueError, "moga: cpu gemm 'avx512' needs a CPU with AVX-512F (and an x86-64 build)");
    return nullptr;
  }
  return PyUnicode_FromString(gemm_impl_name(previous));
}

// _cpu_gemm_in_use() -> "avx512" or "blas": what float products run now ("auto" resolved).
PyObject* cpu_gemm_in_use(PyObject* /*self*/, PyObject* /*unused*/) {
  return PyUnicode_FromString(moga::cpu::use_avx512_gemm() ? "avx512" : "blas");
}

// _cpu_avx512_supported() -> bool: whether this CPU (and build) can run the AVX-512 GEMM.
PyObject* cpu_avx512_supported(PyObject* /*self*/, PyObject* /*unused*/) {
  return PyBool_FromLong(moga::cpu::avx512_gemm_supported() ? 1 : 0);
}

PyMethodDef kMethods[] = {
    {"_cpu_avx512_supported", cpu_avx512_supported, METH_NOARGS, "Whether the CPU can run moga's AVX-512 GEMM."},
    {"_set_cpu_gemm", set_cpu_gemm, METH_O,
     "Select the CPU attention's float GEMM: 'auto', 'avx512' or 'blas'; returns the previous setting."},
    {"_cpu_gemm_in_use", cpu_gemm_in_use, METH_NOARGS, "'avx512' or 'blas': the GEMM CPU attention runs now."},
    {"_set_poison_outputs", set_poison_outputs, METH_O,
     "Fill op outputs with NaN when allocated (tests); returns the previous setting."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "moga._C", "moga compiled operators (torch.ops.moga.*)", -1,
                       kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
