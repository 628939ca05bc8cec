// ember._C: kernel-level op schemas (namespace ember_C) and the Python module.
//
// These ops are the raw kernels: no autograd, no backend choice. The public ops (namespace
// `ember`, with fake kernels and autograd) are declared in Python (pyext/ember/ops/) so ember works
// without this extension; they call these when the "cpu" or "cuda" backend is chosen.
#include <torch/extension.h>
#include <torch/library.h>

#include "ops.h"

namespace ember {

Act parse_act(const std::string& name) {
  if (name == "relu") return Act::kRelu;
  if (name == "silu") return Act::kSilu;
  if (name == "gelu") return Act::kGelu;
  if (name == "gelu_tanh") return Act::kGeluTanh;
  TORCH_CHECK(false, "ember: unknown activation '", name, "'; expected relu, silu, gelu or gelu_tanh");
}

DType to_dtype(c10::ScalarType t, const char* op, const char* arg) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, "ember_C.", op, ": ", arg,
                       " must be float16, bfloat16, float32 or float64, got ", t);
  }
}

void check_rows(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.dim() == 2, "ember_C.", op, ": ", arg, " must be 2-D (rows, cols), got ", t.dim(), "-D");
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "ember_C.", op, ": ", arg,
              " must have a contiguous last dimension, got strides ", t.strides());
}

}  // namespace ember

TORCH_LIBRARY(ember_C, m) {
  m.def("unary_act(Tensor x, str act) -> Tensor");
  m.def("unary_act_backward(Tensor grad_out, Tensor x, str act) -> Tensor");
  m.def("gated_act(Tensor gate, Tensor up, str act) -> Tensor");
  m.def("gated_act_backward(Tensor grad_out, Tensor gate, Tensor up, str act) -> (Tensor, Tensor)");
  // int8 inference (csrc/cpu/int8.cpp); act is -1 (none) or an ember::Act value.
  m.def("quantize_per_token(Tensor x, Tensor? smooth) -> (Tensor, Tensor)");
  m.def(
      "int8_linear_w8a8(Tensor x, Tensor w, Tensor w_scale, Tensor? bias, Tensor? smooth, int act, Tensor? w_packed=None) "
      "-> Tensor");
  m.def("int8_linear_w8a16(Tensor x, Tensor w, Tensor w_scale, Tensor? bias, int act) -> Tensor");
}

namespace ember::cpu {
const char* isa();  // csrc/cpu/dispatch.cpp
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ember compiled kernels (C++ CPU, and CUDA in CUDA builds)";
  m.def("with_cuda", []() {
#ifdef EMBER_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("cpu_isa", []() { return std::string(ember::cpu::isa()); },
        "Instruction set the CPU kernels dispatch to on this machine");
}
