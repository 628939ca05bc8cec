// ember._C: kernel-level op schemas (namespace ember_C) and the Python module.
//
// These ops are the raw kernels: no autograd, no backend choice. The public ops (namespace `ember`)
// are declared with their fake kernels in pyext/ember/ops/_schemas.py, so ember works without this
// extension; their autograd (csrc/autograd.cpp) and their "cpu"/"cuda" backends call these.
#include <torch/extension.h>
#include <torch/library.h>

#include "ops.h"

namespace ember {

Act parse_act(const std::string& name) {
#define EMBER_PARSE(member, text) \
  if (name == text) return Act::member;
  EMBER_FOR_EACH_ACT(EMBER_PARSE)
#undef EMBER_PARSE
  TORCH_CHECK_VALUE(false, "ember: unknown activation '", name, "'; expected one of ", act_names());
}

Act check_act_code(int64_t code, const char* op) {
  bool known = code == static_cast<int64_t>(Act::kNone);
#define EMBER_KNOWN(member, text) known = known || code == static_cast<int64_t>(Act::member);
  EMBER_FOR_EACH_ACT(EMBER_KNOWN)
#undef EMBER_KNOWN
  TORCH_CHECK_VALUE(known, "ember_C.", op, ": act must be -1 (none) or an ember::Act id, got ", code);
  return static_cast<Act>(code);
}

std::string act_names() {
  std::string names;
#define EMBER_NAME(member, text) names += names.empty() ? text : ", " text;
  EMBER_FOR_EACH_ACT(EMBER_NAME)
#undef EMBER_NAME
  return names;
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

static Opt parse_opt(c10::string_view name) {
  if (name == "sgd") return Opt::kSGD;
  if (name == "adam") return Opt::kAdam;
  if (name == "adagrad") return Opt::kAdagrad;
  if (name == "rmsprop") return Opt::kRMSprop;
  if (name == "lion") return Opt::kLion;
  TORCH_CHECK(false, "ember_C.optim_step: unknown optimizer '", std::string(name),
              "'; expected sgd, adam, adagrad, rmsprop or lion");
}

double one_value(const at::Tensor& t, const char* arg) {
  TORCH_CHECK(t.numel() == 1, "ember_C.optim_step: ", arg, " must have one element, got ", t.numel());
  return t.item<double>();
}

OptGroup check_optim_group(c10::string_view kind, at::TensorList params, at::TensorList grads, at::TensorList s1,
                           at::TensorList s2, at::TensorList s3, at::TensorList masters, at::TensorList steps,
                           at::ArrayRef<double> hyper, c10::DeviceType device) {
  OptGroup g{parse_opt(kind), DType::kFloat32, true};
  const size_t n = params.size();
  TORCH_CHECK(hyper.size() == 5, "ember_C.optim_step: hyper must hold 5 numbers (lr, h1, h2, eps, weight_decay), got ",
              hyper.size());
  TORCH_CHECK(grads.size() == n, "ember_C.optim_step: grads has ", grads.size(), " tensors, params ", n);
  const std::pair<const char*, at::TensorList> lists[] = {{"s1", s1}, {"s2", s2}, {"s3", s3}, {"masters", masters},
                                                          {"steps", steps}};
  for (const auto& [name, list] : lists)
    TORCH_CHECK(list.empty() || list.size() == n, "ember_C.optim_step: ", name, " must be empty or hold one tensor ",
                "per parameter (", n, "), got ", list.size());
  if (n == 0) return g;

  const at::Tensor& p0 = params[0];
  g.param_dtype = to_dtype(p0.scalar_type(), "optim_step", "params");
  TORCH_CHECK(p0.device().type() == device, "ember_C.optim_step: params are on ", p0.device(),
              ", this implementation runs on ", device);
  const at::ScalarType state_type = !s1.empty() ? s1[0].scalar_type() : at::kFloat;
  TORCH_CHECK_TYPE(state_type == at::kFloat || state_type == p0.scalar_type(), "ember_C.optim_step: state must be ",
                   "float32 or the parameters' dtype ", p0.scalar_type(), ", got ", state_type);
  // float64 parameters are updated in float64 throughout, state included: float32 state there would
  // be read and written as float64, past the end of its buffer.
  TORCH_CHECK_TYPE(s1.empty() || p0.scalar_type() != at::kDouble || state_type == at::kDouble,
                   "ember_C.optim_step: float64 parameters need float64 state, got ", state_type);
  g.state_fp32 = state_type == at::kFloat;
  TORCH_CHECK(masters.empty() || g.state_fp32, "ember_C.optim_step: master weights need float32 state");

  auto same_layout = [&](const at::Tensor& t, const at::Tensor& p, const char* name, size_t i, at::ScalarType dt) {
    TORCH_CHECK(t.device() == p.device(), "ember_C.optim_step: ", name, "[", i, "] is on ", t.device(),
                ", its parameter on ", p.device());
    TORCH_CHECK_TYPE(t.scalar_type() == dt, "ember_C.optim_step: ", name, "[", i, "] must be ", dt, ", got ",
                     t.scalar_type());
    TORCH_CHECK(t.sizes() == p.sizes() && t.strides() == p.strides(), "ember_C.optim_step: ", name, "[", i,
                "] must have its parameter's shape and strides ", p.sizes(), " ", p.strides(), ", got ", t.sizes(),
                " ", t.strides());
  };
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device() == p0.device() && p.scalar_type() == p0.scalar_type(), "ember_C.optim_step: params[", i,
                "] is ", p.scalar_type(), " on ", p.device(), ", params[0] ", p0.scalar_type(), " on ", p0.device(),
                "; one call takes one (device, dtype) group");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), "ember_C.optim_step: params[", i,
                "] must be dense (non-overlapping, no gaps), got strides ", p.strides());
    same_layout(grads[i], p, "grads", i, p.scalar_type());
    if (!s1.empty()) same_layout(s1[i], p, "s1", i, state_type);
    if (!s2.empty()) same_layout(s2[i], p, "s2", i, state_type);
    if (!s3.empty()) same_layout(s3[i], p, "s3", i, state_type);
    if (!masters.empty()) same_layout(masters[i], p, "masters", i, at::kFloat);
  }
  return g;
}

DType check_adamw8bit_group(at::TensorList params, at::TensorList grads, at::TensorList exp_avg,
                            at::TensorList exp_avg_sq, at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_absmax,
                            at::TensorList steps, at::ArrayRef<double> hyper, int64_t flags, c10::DeviceType device) {
  constexpr const char* op = "ember_C.adamw8bit_step: ";
  const size_t n = params.size();
  TORCH_CHECK(hyper.size() == 5, op, "hyper must hold 5 numbers (lr, beta1, beta2, eps, weight_decay), got ",
              hyper.size());
  TORCH_CHECK(!(flags & kAmsgrad), op, "amsgrad is not supported");
  const std::pair<const char*, at::TensorList> lists[] = {{"grads", grads},
                                                          {"exp_avg", exp_avg},
                                                          {"exp_avg_sq", exp_avg_sq},
                                                          {"exp_avg_absmax", exp_avg_absmax},
                                                          {"exp_avg_sq_absmax", exp_avg_sq_absmax}};
  for (const auto& [name, list] : lists)
    TORCH_CHECK(list.size() == n, op, name, " has ", list.size(), " tensors, params ", n);
  TORCH_CHECK(steps.empty() || steps.size() == n, op, "steps must be empty or hold one tensor per parameter (", n,
              "), got ", steps.size());
  if (n == 0) return DType::kFloat32;
  const at::Tensor& p0 = params[0];
  const DType dtype = to_dtype(p0.scalar_type(), "adamw8bit_step", "params");
  TORCH_CHECK_TYPE(dtype != DType::kFloat64, op, "params must be float32, float16 or bfloat16, got float64");
  TORCH_CHECK(p0.device().type() == device, op, "params are on ", p0.device(), ", this implementation runs on ",
              device);
  // Blocks are runs of kQBlock elements in logical order, so everything is walked contiguously.
  auto check = [&](const at::Tensor& t, const char* name, size_t i, at::ScalarType dt, int64_t numel) {
    TORCH_CHECK(t.device() == p0.device(), op, name, "[", i, "] is on ", t.device(), ", params[0] on ", p0.device());
    TORCH_CHECK_TYPE(t.scalar_type() == dt, op, name, "[", i, "] must be ", dt, ", got ", t.scalar_type());
    TORCH_CHECK(t.numel() == numel, op, name, "[", i, "] must have ", numel, " elements, got ", t.numel());
    TORCH_CHECK(t.is_contiguous(), op, name, "[", i, "] must be contiguous, got strides ", t.strides());
  };
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const int64_t nb = (p.numel() + kQBlock - 1) / kQBlock;
    check(p, "params", i, p0.scalar_type(), p.numel());
    check(grads[i], "grads", i, p0.scalar_type(), p.numel());
    check(exp_avg[i], "exp_avg", i, at::kChar, p.numel());
    check(exp_avg_sq[i], "exp_avg_sq", i, at::kByte, p.numel());
    check(exp_avg_absmax[i], "exp_avg_absmax", i, at::kFloat, nb);
    check(exp_avg_sq_absmax[i], "exp_avg_sq_absmax", i, at::kFloat, nb);
  }
  return dtype;
}

void check_unary_backward(const at::Tensor& grad_out, const at::Tensor& x) {
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "ember_C.unary_act_backward: grad_out shape ", grad_out.sizes(),
              " differs from x shape ", x.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "ember_C.unary_act_backward: grad_out dtype ",
              grad_out.scalar_type(), " differs from x dtype ", x.scalar_type());
}

void check_gated(const at::Tensor& gate, const at::Tensor& up, const char* op) {
  check_rows(gate, op, "gate");
  check_rows(up, op, "up");
  TORCH_CHECK(gate.sizes() == up.sizes(), "ember_C.", op, ": gate and up must have the same shape, got ",
              gate.sizes(), " and ", up.sizes());
  TORCH_CHECK(gate.scalar_type() == up.scalar_type(), "ember_C.", op, ": gate and up must have the same dtype, got ",
              gate.scalar_type(), " and ", up.scalar_type());
}

void check_gated_grad(const at::Tensor& grad_out, const at::Tensor& gate) {
  TORCH_CHECK(grad_out.sizes() == gate.sizes() && grad_out.scalar_type() == gate.scalar_type(),
              "ember_C.gated_act_backward: grad_out must match gate in shape and dtype, got ", grad_out.sizes(), " ",
              grad_out.scalar_type(), " and ", gate.sizes(), " ", gate.scalar_type());
}

}  // namespace ember

TORCH_LIBRARY(ember_C, m) {
  m.def("unary_act(Tensor x, str act) -> Tensor");
  m.def("unary_act_backward(Tensor grad_out, Tensor x, str act) -> Tensor");
  m.def("gated_act(Tensor gate, Tensor up, str act) -> Tensor");
  m.def("gated_act_backward(Tensor grad_out, Tensor gate, Tensor up, str act) -> (Tensor, Tensor)");
  // act: "none" or an activation name. Returns (out, preact); preact is empty unless save_preact and
  // act != "none". Unneeded backward outputs come back as empty tensors.
  m.def("linear_act(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, str act, bool save_preact) -> (Tensor, Tensor)");
  m.def("linear_act_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor preact, str act, bool need_dx, "
        "bool need_dw, bool need_db) -> (Tensor, Tensor, Tensor)");
  // h = act(x @ w_gate^T + b_gate) * (x @ w_up^T + b_up); preact is (rows, 2I) = [gate | up] when saved.
  m.def("gated_linear(Tensor x, Tensor w_gate, Tensor w_up, Tensor? b_gate, Tensor? b_up, str act, bool save_preact) "
        "-> (Tensor, Tensor)");
  m.def("gated_linear_backward(Tensor grad_out, Tensor x, Tensor w_gate, Tensor w_up, Tensor preact, str act, "
        "bool need_dx, bool need_dw, bool need_db) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Mixture-of-experts: every expert's down(act(gate) * up) over x's rows sorted by expert; offsets[e] is
  // expert e's end row. w_gate_up (E, 2I, H) holds each expert's gate rows then its up rows, w_down
  // (E, H, I). Returns (out, preact); preact (rows, 2I) = [gate | up] when saved.
  m.def("grouped_gated_mlp(Tensor x, Tensor w_gate_up, Tensor w_down, Tensor offsets, str act, bool save_preact) "
        "-> (Tensor, Tensor)");
  m.def("grouped_gated_mlp_backward(Tensor grad_out, Tensor x, Tensor w_gate_up, Tensor w_down, Tensor offsets, "
        "Tensor preact, str act, bool need_dx, bool need_dw) -> (Tensor, Tensor, Tensor)");
  // Fused linear + cross-entropy (csrc/linear_cross_entropy.h): the loss of
  // cross_entropy(x @ weight^T + bias, target) without the logits; with need_* (reduction mean / sum)
  // also the gradients of that loss. chunk_rows: token rows per chunk, 0 for lce_chunk_rows' choice.
  m.def("linear_cross_entropy(Tensor x, Tensor weight, Tensor? bias, Tensor target, int ignore_index, str reduction, "
        "float label_smoothing, bool need_dx, bool need_dw, bool need_db, int chunk_rows) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // reduction "none": dx, dW, db for the per-row upstream gradient grad_loss (rows,), recomputing the logits.
  m.def("linear_cross_entropy_backward(Tensor grad_loss, Tensor x, Tensor weight, Tensor? bias, Tensor target, "
        "int ignore_index, float label_smoothing, bool need_dx, bool need_dw, bool need_db, int chunk_rows) "
        "-> (Tensor, Tensor, Tensor)");
  // One optimizer step over a (device, dtype) group; see csrc/optim.h for kinds, slots and hyper.
  m.def(
      "optim_step(str kind, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] s1, Tensor(c!)[] s2, "
      "Tensor(d!)[] s3, Tensor(e!)[] masters, Tensor(f!)[] steps, float[] hyper, int flags, Tensor? lr, "
      "Tensor? grad_scale, Tensor? found_inf) -> ()");
  // AdamW with block-wise 8-bit moments (csrc/optim8bit.h): exp_avg int8, exp_avg_sq uint8, one fp32
  // absmax per 256 elements of each; hyper = [lr, beta1, beta2, eps, weight_decay], flags as optim_step's.
  m.def(
      "adamw8bit_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_avg_sq, "
      "Tensor(d!)[] exp_avg_absmax, Tensor(e!)[] exp_avg_sq_absmax, Tensor(f!)[] steps, float[] hyper, int flags, "
      "Tensor? lr, Tensor? grad_scale, Tensor? found_inf) -> ()");
  // int8 inference (csrc/cpu/int8.cpp); act is -1 (none) or an ember::Act value.
  m.def("quantize_per_token(Tensor x, Tensor? smooth) -> (Tensor, Tensor)");
  m.def(
      "int8_linear_w8a8(Tensor x, Tensor w, Tensor w_scale, Tensor? bias, Tensor? smooth, int act, Tensor? w_packed=None) "
      "-> Tensor");
  m.def("int8_linear_w8a16(Tensor x, Tensor w, Tensor w_scale, Tensor? bias, int act) -> Tensor");
  // The packed weight int8_linear_w8a8 reads as w_packed (its layout: csrc/cpu/int8.cpp), or an empty
  // tensor where the shape has none; the group size follows from w_scale's shape.
  m.def("int8_prepack(Tensor w, Tensor w_scale) -> Tensor");
}

namespace ember::cpu {
const char* isa();              // csrc/cpu/dispatch.cpp
double int8_peak_macs();        // csrc/cpu/int8_peak.cpp
std::string isa_report();       // csrc/cpu/dispatch.cpp
double amx_peak_macs(bool bf16);  // csrc/cpu/isa_amx.cpp
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
  m.def("activations", []() {
    std::vector<std::pair<std::string, int>> acts;
#define EMBER_ENTRY(member, text) acts.emplace_back(text, static_cast<int>(ember::Act::member));
    EMBER_FOR_EACH_ACT(EMBER_ENTRY)
#undef EMBER_ENTRY
    return acts;
  }, "(name, ember::Act id) of every activation the kernels were built with");
  m.def("cpu_isa", []() { return std::string(ember::cpu::isa()); },
        "Instruction set the CPU kernels dispatch to on this machine");
  m.def("int8_peak_macs", &ember::cpu::int8_peak_macs,
        "Measured int8 multiply-accumulates per second (AVX512-VNNI vpdpbusd, all torch threads); 0 without VNNI");
  // AMX (issue #12): which int8 kernels run and why AMX is off if it is; the tile unit's measured rate.
  m.def("cpu_isa_report", []() { return ember::cpu::isa_report(); },
        "The CPU kernel table, the int8 kernels it runs, and why AMX is off if it is (one 'key: value' a line)");
  m.def("amx_peak_macs", &ember::cpu::amx_peak_macs, pybind11::arg("bf16") = false,
        "Measured AMX multiply-accumulates per second (TDPBUSD int8, or TDPBF16PS when bf16), all torch "
        "threads; 0 when AMX is not in use");
}
