// The eager entry points of ember's fused ops: what `ember.ops.linear`, `gated_linear`, the activations
// and swiglu/geglu call for plain eager tensors on the "cpu"/"cuda" backends (pyext/ember/ops/_common.py,
// eager_native). Each is one Python -> C++ call that checks its arguments, reshapes, and runs the ember_C
// kernels through the dispatcher (so the same code serves CPU and, in CUDA builds, CUDA tensors), with
// autograd as a C++ torch::autograd::Function when a gradient is wanted.
//
// Why in C++: at M = 1 a Linear takes ~80 us on this project's CPU, and the Python route (argument checks,
// a Python autograd.Function's apply and its Python backward callback) cost 20-60 us of it. Saved tensors
// and gradients are those of the registered autograd of the `ember::` custom ops, which
// torch.compile / export / dispatch modes still use.
//
// Bad arguments raise here (c10::Error and friends); the Python caller then runs its own checks, which
// name the argument in the usual ember.ops message. So every check below must be at least as strict as
// the Python one: a call that passes here must be one the Python path accepts.
#include <torch/autograd.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/_unsafe_view.h>

#include "activation.h"
#include "eager.h"

namespace ember::eager {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// ---- the ember_C kernel ops, looked up once --------------------------------------------------
#define EMBER_KERNEL(fn, name, ...)                                                                        \
  const c10::TypedOperatorHandle<__VA_ARGS__>& fn() {                                                      \
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<__VA_ARGS__>(); \
    return op;                                                                                             \
  }
EMBER_KERNEL(linear_act_op, "ember_C::linear_act",
             std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                        c10::string_view, bool))
EMBER_KERNEL(linear_act_backward_op, "ember_C::linear_act_backward",
             std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                c10::string_view, bool, bool, bool))
EMBER_KERNEL(gated_linear_op, "ember_C::gated_linear",
             std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                        const OptTensor&, c10::string_view, bool))
EMBER_KERNEL(gated_linear_backward_op, "ember_C::gated_linear_backward",
             std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                const Tensor&, const Tensor&, c10::string_view,
                                                                bool, bool, bool))
EMBER_KERNEL(unary_act_op, "ember_C::unary_act", Tensor(const Tensor&, c10::string_view))
EMBER_KERNEL(unary_act_backward_op, "ember_C::unary_act_backward",
             Tensor(const Tensor&, const Tensor&, c10::string_view))
EMBER_KERNEL(gated_act_op, "ember_C::gated_act", Tensor(const Tensor&, const Tensor&, c10::string_view))
EMBER_KERNEL(gated_act_backward_op, "ember_C::gated_act_backward",
             std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, c10::string_view))
#undef EMBER_KERNEL

// ---- argument checks (the kernels check dtypes and 2-D shapes; these add what they cannot see) -------
void check_dense(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined() && t.layout() == at::kStrided, "ember.ops.", op, ": ", name, " must be a dense tensor");
}

void check_operand(const Tensor& t, const Tensor& x, const char* op, const char* name) {
  check_dense(t, op, name);
  TORCH_CHECK(t.device() == x.device(), "ember.ops.", op, ": ", name, " is on ", t.device(), ", x on ", x.device());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), "ember.ops.", op, ": ", name, " has dtype ", t.scalar_type(),
                   ", x has ", x.scalar_type());
}

// The linear epilogue takes "none" and every activation of the table (EMBER_FOR_EACH_ACT); the gated forms
// take ember.activations.GATED (silu, gelu, gelu_tanh). A name this rejects falls back to the Python
// checks, which name the choices.
void check_act(const std::string& act, bool gated, const char* op) {
  bool ok = gated ? (act == "silu" || act == "gelu" || act == "gelu_tanh") : act == "none";
#define EMBER_KNOWN(member, text) ok = ok || (!gated && act == text);
  EMBER_FOR_EACH_ACT(EMBER_KNOWN)
#undef EMBER_KNOWN
  TORCH_CHECK_VALUE(ok, "ember.ops.", op, ": unsupported activation '", act, "'");
}

// (rows, last dim) with a contiguous last dimension: a view when the layout allows, else one copy
// (as pyext/ember/ops/_common.py:as_rows).
Tensor rows(const Tensor& t) {
  if (t.dim() == 2 && (t.size(1) <= 1 || t.stride(1) == 1)) return t;
  const int64_t cols = t.dim() ? t.size(-1) : 1;
  // The row count spelled out: reshape({-1, 0}) is ambiguous for a (..., 0) tensor and raises.
  int64_t nrows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) nrows *= t.size(d);
  Tensor r = t.reshape({nrows, cols});
  return r.size(1) <= 1 || r.stride(1) == 1 ? r : r.contiguous();
}

// The output (rows, n) as x's leading dims + n. _unsafe_view: a view made here (grad mode off) would
// make autograd refuse in-place updates of the result, which users do (y.add_(...)).
Tensor shaped_like(const Tensor& out2, const Tensor& x) {
  if (x.dim() == 2) return out2;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(out2.size(1));
  return at::_unsafe_view(out2, shape);
}

bool grad_wanted(std::initializer_list<const Tensor*> ts) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : ts)
    if (t->defined() && t->requires_grad()) return true;
  return false;
}

const Tensor& or_undefined(const OptTensor& t) {
  static const Tensor undefined;
  return t.has_value() ? *t : undefined;
}

// Backward with create_graph=True: ember's backward kernels have no derivative of their own. Gradients
// computed then are routed through this node, which raises if anything backpropagates through them
// (what @once_differentiable does for Python Functions) instead of yielding wrong second derivatives.
struct NotTwice : public torch::autograd::Function<NotTwice> {
  // TensorList, not variable_list: autograd only sees tensors passed as Tensor / TensorList arguments.
  static variable_list forward(AutogradContext*, at::TensorList outputs, at::TensorList /*sources*/) {
    return outputs.vec();
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "ember: the backward of ember's fused ops is not differentiable (double backward); use "
                "backend=\"reference\" for higher-order gradients");
  }
};

variable_list once_differentiable(variable_list grads, variable_list sources) {
  if (!at::GradMode::is_enabled()) return grads;
  bool any = false;
  for (const Tensor& s : sources) any = any || (s.defined() && s.requires_grad());
  if (!any) return grads;
  variable_list defined;
  for (const Tensor& g : grads)
    if (g.defined()) defined.push_back(g);
  variable_list wrapped = NotTwice::apply(at::TensorList(defined), at::TensorList(sources));
  size_t k = 0;
  for (Tensor& g : grads)
    if (g.defined()) g = wrapped[k++];
  return grads;
}

// ---- linear: act(x @ W^T + b) [+ residual] ----------------------------------------------------------
struct LinearFn : public torch::autograd::Function<LinearFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                        const OptTensor& residual, const std::string& act) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const OptTensor r2 = residual.has_value() ? OptTensor(rows(*residual)) : std::nullopt;
    auto [out, pre] = linear_act_op().call(rows(x), weight, bias, r2, act, act != "none");
    ctx->save_for_backward({x, weight, pre});
    ctx->saved_data["act"] = act;
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["has_residual"] = residual.has_value();
    return shaped_like(out, x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &pre = saved[2];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool has_res = ctx->saved_data["has_residual"].toBool();
    // Edges exist for the tensor arguments that were given: x, weight, [bias], [residual].
    const size_t bias_edge = 2, res_edge = has_bias ? 3 : 2;
    const bool need_dx = ctx->needs_input_grad(0), need_dw = ctx->needs_input_grad(1);
    const bool need_db = has_bias && ctx->needs_input_grad(bias_edge);
    const bool need_dr = has_res && ctx->needs_input_grad(res_edge);
    const Tensor& grad = grads[0];
    Tensor dx, dw, db;
    {
      at::NoGradGuard no_grad;
      std::tie(dx, dw, db) = linear_act_backward_op().call(rows(grad), rows(x), weight, pre,
                                                           ctx->saved_data["act"].toStringRef(), need_dx, need_dw,
                                                           need_db);
    }
    variable_list out = {need_dx ? dx.view(x.sizes()) : Tensor(), need_dw ? dw : Tensor(),
                         need_db ? db : Tensor(), need_dr ? grad : Tensor(), Tensor()};
    return once_differentiable(std::move(out), {grad, x, weight});
  }
};

// ---- gated_linear: act(x @ Wg^T + bg) * (x @ Wu^T + bu) ------------------------------------------------
struct GatedLinearFn : public torch::autograd::Function<GatedLinearFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w_gate, const Tensor& w_up,
                        const OptTensor& b_gate, const OptTensor& b_up, const std::string& act) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [h, pre] = gated_linear_op().call(rows(x), w_gate, w_up, b_gate, b_up, act, true);
    ctx->save_for_backward({x, w_gate, w_up, pre});
    ctx->saved_data["act"] = act;
    ctx->saved_data["has_bias"] = b_gate.has_value();
    return shaped_like(h, x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w_gate = saved[1], &w_up = saved[2], &pre = saved[3];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();  // both biases or neither
    const bool need_dx = ctx->needs_input_grad(0), need_dwg = ctx->needs_input_grad(1);
    const bool need_dwu = ctx->needs_input_grad(2);
    const bool need_dbg = has_bias && ctx->needs_input_grad(3), need_dbu = has_bias && ctx->needs_input_grad(4);
    const Tensor& grad = grads[0];
    Tensor dx, dwg, dwu, dbg, dbu;
    {
      at::NoGradGuard no_grad;
      std::tie(dx, dwg, dwu, dbg, dbu) =
          gated_linear_backward_op().call(rows(grad), rows(x), w_gate, w_up, pre,
                                          ctx->saved_data["act"].toStringRef(), need_dx, need_dwg || need_dwu,
                                          need_dbg || need_dbu);
    }
    variable_list out = {need_dx ? dx.view(x.sizes()) : Tensor(), need_dwg ? dwg : Tensor(),
                         need_dwu ? dwu : Tensor(), need_dbg ? dbg : Tensor(), need_dbu ? dbu : Tensor(), Tensor()};
    return once_differentiable(std::move(out), {grad, x, w_gate, w_up});
  }
};

// ---- activations ---------------------------------------------------------------------------------
struct UnaryActFn : public torch::autograd::Function<UnaryActFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const std::string& act) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({x});
    ctx->saved_data["act"] = act;
    return unary_act_op().call(x, act);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor x = ctx->get_saved_variables()[0];
    Tensor dx;
    {
      at::NoGradGuard no_grad;
      dx = unary_act_backward_op().call(grads[0], x, ctx->saved_data["act"].toStringRef());
    }
    return once_differentiable({dx, Tensor()}, {grads[0], x});
  }
};

struct GatedActFn : public torch::autograd::Function<GatedActFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& gate, const Tensor& up, const std::string& act) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({gate, up});
    ctx->saved_data["act"] = act;
    return at::_unsafe_view(gated_act_op().call(rows(gate), rows(up), act), gate.sizes());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &gate = saved[0], &up = saved[1];
    const Tensor g2 = rows(gate);
    Tensor dgate, dup;
    {
      at::NoGradGuard no_grad;
      std::tie(dgate, dup) = gated_act_backward_op().call(rows(grads[0].reshape(gate.sizes())), g2, rows(up),
                                                          ctx->saved_data["act"].toStringRef());
    }
    return once_differentiable({dgate.view(gate.sizes()), dup.view(gate.sizes()), Tensor()}, {grads[0], gate, up});
  }
};

}  // namespace

Tensor linear(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& residual,
              const std::string& act) {
  constexpr const char* op = "linear";
  check_dense(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "ember.ops.linear: x must have at least 1 dimension");
  check_operand(weight, x, op, "weight");
  if (bias.has_value()) check_operand(*bias, x, op, "bias");
  check_act(act, /*gated=*/false, op);
  if (residual.has_value()) {
    check_operand(*residual, x, op, "residual");
    TORCH_CHECK_VALUE(weight.dim() == 2 && residual->dim() == x.dim() &&
                          residual->sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1) &&
                          residual->size(-1) == weight.size(0),
                      "ember.ops.linear: residual must have the output's shape");
  }
  if (grad_wanted({&x, &weight, &or_undefined(bias), &or_undefined(residual)}))
    return LinearFn::apply(x, weight, bias, residual, act);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const OptTensor r2 = residual.has_value() ? OptTensor(rows(*residual)) : std::nullopt;
  return shaped_like(std::get<0>(linear_act_op().call(rows(x), weight, bias, r2, act, false)), x);
}

Tensor gated_linear(const Tensor& x, const Tensor& w_gate, const Tensor& w_up, const OptTensor& b_gate,
                    const OptTensor& b_up, const std::string& act) {
  constexpr const char* op = "gated_linear";
  check_dense(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "ember.ops.gated_linear: x must have at least 1 dimension");
  check_operand(w_gate, x, op, "w_gate");
  check_operand(w_up, x, op, "w_up");
  TORCH_CHECK_VALUE(b_gate.has_value() == b_up.has_value(), "ember.ops.gated_linear: give both biases or neither");
  if (b_gate.has_value()) {
    check_operand(*b_gate, x, op, "b_gate");
    check_operand(*b_up, x, op, "b_up");
  }
  check_act(act, /*gated=*/true, op);
  if (grad_wanted({&x, &w_gate, &w_up, &or_undefined(b_gate), &or_undefined(b_up)}))
    return GatedLinearFn::apply(x, w_gate, w_up, b_gate, b_up, act);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return shaped_like(std::get<0>(gated_linear_op().call(rows(x), w_gate, w_up, b_gate, b_up, act, false)), x);
}

Tensor unary_act(const Tensor& x, const std::string& act) {
  check_dense(x, "activation", "x");
  TORCH_CHECK_VALUE(act != "none", "ember.ops: unary activation 'none'");
  check_act(act, /*gated=*/false, "activation");
  if (grad_wanted({&x})) return UnaryActFn::apply(x, act);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return unary_act_op().call(x, act);
}

Tensor gated_act(const Tensor& gate, const Tensor& up, const std::string& act) {
  constexpr const char* op = "gated activation";
  check_dense(gate, op, "gate");
  check_operand(up, gate, op, "up");
  TORCH_CHECK_VALUE(gate.sizes() == up.sizes(), "ember.ops: gate and up must have the same shape");
  check_act(act, /*gated=*/true, op);
  if (grad_wanted({&gate, &up})) return GatedActFn::apply(gate, up, act);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return at::_unsafe_view(gated_act_op().call(rows(gate), rows(up), act), gate.sizes());
}

}  // namespace ember::eager
