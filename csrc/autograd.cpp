// The one autograd of each `ember::` op, registered under the Autograd key (as torchvision's ops do).
// The schemas and fake kernels are declared in pyext/ember/ops/_schemas.py; the CPU/CUDA kernels
// registered there (Python) run whichever backend the op's `backend` argument names.
//
// Every call of an ember op, eager or traced, enters here first. For plain eager tensors on the "cpu" /
// "cuda" backends these kernels call the ember_C kernels themselves (reshaping to the 2-D operands they
// take), so an eager call is one trip through the dispatcher, as cheap as torch's own ops: at M = 1 a
// Linear+GELU is a few microseconds of compute, and a second trip through Python kernels would double
// it. Everything else (another backend, "auto" baked into a compiled graph, fake / functional tensors,
// a dispatch mode, functorch wrappers) goes below autograd to the op's registered kernel, so tracing and
// dispatch modes see the ember op.
//
// Memory: what autograd keeps is documented in pyext/ember/ops/linear.py and gated.py.
#include <torch/autograd.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/_unsafe_view.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/library.h>

#include "activation.h"
#include "ops.h"

namespace ember::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using Str = c10::string_view;

// ---- the ops, looked up once: ember_C's kernels and the ember ops themselves ---------------------
#define EMBER_OP(fn, name, ...)                                                                            \
  const c10::TypedOperatorHandle<__VA_ARGS__>& fn() {                                                      \
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<__VA_ARGS__>(); \
    return op;                                                                                             \
  }
using LinearSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, Str,
                                             bool, Str);
using LinearBackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                             const OptTensor&, const Tensor&, Str, bool, bool, bool,
                                                             Str);
using GatedLinearSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                                  const OptTensor&, Str, bool, Str);
using GatedLinearBackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&,
    Str, bool, bool, bool, Str);
using Int8LinearSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, Str,
                             Str, Str, const OptTensor&);

EMBER_OP(linear_op, "ember::linear_act", LinearSig)
EMBER_OP(linear_backward_op, "ember::linear_act_backward", LinearBackwardSig)
EMBER_OP(gated_linear_op, "ember::gated_linear", GatedLinearSig)
EMBER_OP(gated_linear_backward_op, "ember::gated_linear_backward", GatedLinearBackwardSig)
using GroupedMlpSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, Str, bool);
using GroupedMlpBackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                 const Tensor&, const Tensor&, const Tensor&, Str,
                                                                 bool, bool);
EMBER_OP(grouped_mlp_op, "ember::grouped_gated_mlp",
         std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, Str, bool, Str))
EMBER_OP(grouped_mlp_backward_op, "ember::grouped_gated_mlp_backward",
         std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                            const Tensor&, Str, bool, bool, Str))
EMBER_OP(c_grouped_mlp, "ember_C::grouped_gated_mlp", GroupedMlpSig)
EMBER_OP(c_grouped_mlp_backward, "ember_C::grouped_gated_mlp_backward", GroupedMlpBackwardSig)
EMBER_OP(unary_act_op, "ember::unary_act", Tensor(const Tensor&, Str, Str))
EMBER_OP(unary_act_backward_op, "ember::unary_act_backward", Tensor(const Tensor&, const Tensor&, Str, Str))
EMBER_OP(gated_act_op, "ember::gated_act", Tensor(const Tensor&, const Tensor&, Str, Str))
EMBER_OP(gated_act_backward_op, "ember::gated_act_backward",
         std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, Str, Str))
EMBER_OP(int8_linear_op, "ember::int8_linear", Int8LinearSig)
using LceSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
                                                          int64_t, Str, double, bool, bool, bool, int64_t, Str);
using LceBackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                                          const Tensor&, int64_t, double, bool, bool, bool, int64_t,
                                                          Str);
EMBER_OP(lce_op, "ember::linear_cross_entropy", LceSig)
EMBER_OP(lce_backward_op, "ember::linear_cross_entropy_backward", LceBackwardSig)
EMBER_OP(c_lce, "ember_C::linear_cross_entropy",
         std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
                                                    int64_t, Str, double, bool, bool, bool, int64_t))
EMBER_OP(c_lce_backward, "ember_C::linear_cross_entropy_backward",
         std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                            const Tensor&, int64_t, double, bool, bool, bool, int64_t))

EMBER_OP(c_linear_act, "ember_C::linear_act",
         std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, Str, bool))
EMBER_OP(c_linear_act_backward, "ember_C::linear_act_backward",
         std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, Str, bool,
                                            bool, bool))
EMBER_OP(c_gated_linear, "ember_C::gated_linear",
         std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                    Str, bool))
EMBER_OP(c_gated_linear_backward, "ember_C::gated_linear_backward",
         std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                            const Tensor&, const Tensor&, Str, bool, bool, bool))
EMBER_OP(c_unary_act, "ember_C::unary_act", Tensor(const Tensor&, Str))
EMBER_OP(c_unary_act_backward, "ember_C::unary_act_backward", Tensor(const Tensor&, const Tensor&, Str))
EMBER_OP(c_gated_act, "ember_C::gated_act", Tensor(const Tensor&, const Tensor&, Str))
EMBER_OP(c_gated_act_backward, "ember_C::gated_act_backward",
         std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, Str))
EMBER_OP(c_int8_w8a8, "ember_C::int8_linear_w8a8",
         Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, int64_t,
                const OptTensor&))
EMBER_OP(c_int8_w8a16, "ember_C::int8_linear_w8a16",
         Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, int64_t))
#undef EMBER_OP

// ---- when the ember_C kernels may be called directly ---------------------------------------------
// Tensors that are not plain CPU/CUDA tensors (fake, functional, meta, functorch-wrapped, subclasses
// with the Python key) and active dispatch modes must see the ember op, below autograd. (Meta is a
// backend bit, not a functionality key, so it is asked for apart: in a key set it would match CPU too.)
bool plain(std::initializer_list<const Tensor*> ts) {
  static const c10::DispatchKeySet not_plain({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                              c10::DispatchKey::Functionalize, c10::DispatchKey::FuncTorchBatched,
                                              c10::DispatchKey::FuncTorchGradWrapper});
  if (c10::impl::TorchDispatchModeTLS::any_modes_set() ||
      c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode))
    return false;
  for (const Tensor* t : ts)
    if (t->defined() && (t->key_set().has_any(not_plain) || t->is_meta())) return false;
  return true;
}

bool native(Str backend) { return backend == "cpu" || backend == "cuda"; }

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

OptTensor opt_rows(const OptTensor& t) { return t.has_value() ? OptTensor(rows(*t)) : std::nullopt; }

// The output (rows, n) as x's leading dims + n. _unsafe_view: an op's output must not be a view (autograd
// would then refuse in-place updates of the result, which users do: y.add_(...)).
Tensor shaped_like(const Tensor& out2, const Tensor& x) {
  if (x.dim() == 2) return out2;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(out2.size(1));
  return at::_unsafe_view(out2, shape);
}

Tensor viewed_as(const Tensor& t, const Tensor& like) {
  return t.sizes() == like.sizes() ? t : at::_unsafe_view(t, like.sizes());
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
                "ember: the backward of ember's fused ops is not differentiable (double backward): their "
                "backward kernels have no derivative of their own; compute higher-order gradients with torch's "
                "own ops");
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

Tensor empty_like_none(const Tensor& x) { return at::empty({0}, x.options()); }

// ==== linear: act(x @ W^T + b) [+ residual] =========================================================
std::tuple<Tensor, Tensor> linear_below(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                        const OptTensor& residual, Str act, bool save_preact, Str backend) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (native(backend) && plain({&x, &weight, &or_undefined(bias), &or_undefined(residual)})) {
    auto [out, pre] = c_linear_act().call(rows(x), weight, bias, opt_rows(residual), act, save_preact);
    return {shaped_like(out, x), pre};
  }
  return linear_op().call(x, weight, bias, residual, act, save_preact, backend);
}

struct LinearFn : public torch::autograd::Function<LinearFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                               const OptTensor& residual, const std::string& act, bool save_preact,
                               const std::string& backend) {
    const bool keep = act != "none";
    // ReLU's derivative reads the same off its output (out <= 0 exactly where pre <= 0, NaN passing in
    // both), so without a residual the output stands in for the pre-activation, as torch's relu saves
    // its result: one (rows, N) buffer kept for backward instead of two.
    const bool grad_from_out = act == "relu" && !residual.has_value() && !save_preact;
    auto [out, pre] = linear_below(x, weight, bias, residual, act, (save_preact || keep) && !grad_from_out, backend);
    ctx->save_for_backward({x, weight, or_undefined(bias), grad_from_out ? out : pre});
    ctx->saved_data["act"] = act;
    ctx->saved_data["backend"] = backend;
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["has_residual"] = residual.has_value();
    ctx->saved_data["grad_from_out"] = grad_from_out;
    Tensor pre_out = save_preact && keep ? pre : empty_like_none(x);
    ctx->mark_non_differentiable({pre_out});
    return {out, pre_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1];
    // a saved output has x's rank; the kernels take it as (rows, N), as the pre-activation is
    const Tensor pre = ctx->saved_data["grad_from_out"].toBool() ? rows(saved[3]) : saved[3];
    const OptTensor bias = saved[2].defined() ? OptTensor(saved[2]) : std::nullopt;
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool has_res = ctx->saved_data["has_residual"].toBool();
    const std::string act = ctx->saved_data["act"].toStringRef();
    const std::string backend = ctx->saved_data["backend"].toStringRef();
    // Edges exist for the tensor arguments that were given: x, weight, [bias], [residual].
    const size_t bias_edge = 2, res_edge = has_bias ? 3 : 2;
    const bool need_dx = ctx->needs_input_grad(0), need_dw = ctx->needs_input_grad(1);
    const bool need_db = has_bias && ctx->needs_input_grad(bias_edge);
    const bool need_dr = has_res && ctx->needs_input_grad(res_edge);
    const Tensor& grad = grads[0];
    Tensor dx, dw, db;
    {
      at::NoGradGuard no_grad;
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      if (native(backend) && plain({&grad, &x, &weight, &pre})) {
        std::tie(dx, dw, db) =
            c_linear_act_backward().call(rows(grad), rows(x), weight, pre, act, need_dx, need_dw, need_db);
        if (need_dx) dx = viewed_as(dx, x);
      } else {
        std::tie(dx, dw, db) = linear_backward_op().call(grad.contiguous(), x, weight, bias, pre, act, need_dx,
                                                         need_dw, need_db, backend);
      }
    }
    variable_list out = {need_dx ? dx : Tensor(), need_dw ? dw : Tensor(), need_db ? db : Tensor(),
                         need_dr ? grad : Tensor(), Tensor(), Tensor(), Tensor()};
    return once_differentiable(std::move(out), {grad, x, weight});
  }
};

std::tuple<Tensor, Tensor> linear_autograd(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                           const OptTensor& residual, Str act, bool save_preact, Str backend) {
  if (!grad_wanted({&x, &weight, &or_undefined(bias), &or_undefined(residual)}))
    return linear_below(x, weight, bias, residual, act, save_preact, backend);
  auto outs = LinearFn::apply(x, weight, bias, residual, std::string(act), save_preact, std::string(backend));
  return {outs[0], outs[1]};
}

// ==== gated_linear: act(x @ Wg^T + bg) * (x @ Wu^T + bu) =============================================
std::tuple<Tensor, Tensor> gated_linear_below(const Tensor& x, const Tensor& w_gate, const Tensor& w_up,
                                              const OptTensor& b_gate, const OptTensor& b_up, Str act,
                                              bool save_preact, Str backend) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (native(backend) && plain({&x, &w_gate, &w_up, &or_undefined(b_gate), &or_undefined(b_up)})) {
    auto [h, pre] = c_gated_linear().call(rows(x), w_gate, w_up, b_gate, b_up, act, save_preact);
    return {shaped_like(h, x), pre};
  }
  return gated_linear_op().call(x, w_gate, w_up, b_gate, b_up, act, save_preact, backend);
}

struct GatedLinearFn : public torch::autograd::Function<GatedLinearFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& w_gate, const Tensor& w_up,
                               const OptTensor& b_gate, const OptTensor& b_up, const std::string& act,
                               bool save_preact, const std::string& backend) {
    auto [h, pre] = gated_linear_below(x, w_gate, w_up, b_gate, b_up, act, true, backend);
    ctx->save_for_backward({x, w_gate, w_up, or_undefined(b_gate), or_undefined(b_up), pre});
    ctx->saved_data["act"] = act;
    ctx->saved_data["backend"] = backend;
    Tensor pre_out = save_preact ? pre : empty_like_none(x);
    ctx->mark_non_differentiable({pre_out});
    return {h, pre_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w_gate = saved[1], &w_up = saved[2], &pre = saved[5];
    const OptTensor b_gate = saved[3].defined() ? OptTensor(saved[3]) : std::nullopt;
    const OptTensor b_up = saved[4].defined() ? OptTensor(saved[4]) : std::nullopt;
    const bool has_bias = b_gate.has_value();  // both biases or neither
    const std::string act = ctx->saved_data["act"].toStringRef();
    const std::string backend = ctx->saved_data["backend"].toStringRef();
    const bool need_dx = ctx->needs_input_grad(0), need_dwg = ctx->needs_input_grad(1);
    const bool need_dwu = ctx->needs_input_grad(2);
    const bool need_dbg = has_bias && ctx->needs_input_grad(3), need_dbu = has_bias && ctx->needs_input_grad(4);
    const Tensor& grad = grads[0];
    Tensor dx, dwg, dwu, dbg, dbu;
    {
      at::NoGradGuard no_grad;
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      if (native(backend) && plain({&grad, &x, &w_gate, &w_up, &pre})) {
        std::tie(dx, dwg, dwu, dbg, dbu) = c_gated_linear_backward().call(
            rows(grad), rows(x), w_gate, w_up, pre, act, need_dx, need_dwg || need_dwu, need_dbg || need_dbu);
        if (need_dx) dx = viewed_as(dx, x);
      } else {
        std::tie(dx, dwg, dwu, dbg, dbu) =
            gated_linear_backward_op().call(grad.contiguous(), x, w_gate, w_up, b_gate, b_up, pre, act, need_dx,
                                            need_dwg || need_dwu, need_dbg || need_dbu, backend);
      }
    }
    variable_list out = {need_dx ? dx : Tensor(),   need_dwg ? dwg : Tensor(), need_dwu ? dwu : Tensor(),
                         need_dbg ? dbg : Tensor(), need_dbu ? dbu : Tensor(), Tensor(),
                         Tensor(),                  Tensor()};
    return once_differentiable(std::move(out), {grad, x, w_gate, w_up});
  }
};

std::tuple<Tensor, Tensor> gated_linear_autograd(const Tensor& x, const Tensor& w_gate, const Tensor& w_up,
                                                 const OptTensor& b_gate, const OptTensor& b_up, Str act,
                                                 bool save_preact, Str backend) {
  if (!grad_wanted({&x, &w_gate, &w_up, &or_undefined(b_gate), &or_undefined(b_up)}))
    return gated_linear_below(x, w_gate, w_up, b_gate, b_up, act, save_preact, backend);
  auto outs =
      GatedLinearFn::apply(x, w_gate, w_up, b_gate, b_up, std::string(act), save_preact, std::string(backend));
  return {outs[0], outs[1]};
}

// ==== grouped_gated_mlp: every expert's down(act(gate) * up) over rows sorted by expert ===============
std::tuple<Tensor, Tensor> grouped_mlp_below(const Tensor& x, const Tensor& w_gate_up, const Tensor& w_down,
                                             const Tensor& offsets, Str act, bool save_preact, Str backend) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (backend == "cpu" && plain({&x, &w_gate_up, &w_down, &offsets}))
    return c_grouped_mlp().call(x, w_gate_up, w_down, offsets, act, save_preact);
  return grouped_mlp_op().call(x, w_gate_up, w_down, offsets, act, save_preact, backend);
}

struct GroupedMlpFn : public torch::autograd::Function<GroupedMlpFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& w_gate_up, const Tensor& w_down,
                               const Tensor& offsets, const std::string& act, bool save_preact,
                               const std::string& backend) {
    auto [out, pre] = grouped_mlp_below(x, w_gate_up, w_down, offsets, act, true, backend);
    ctx->save_for_backward({x, w_gate_up, w_down, offsets, pre});
    ctx->saved_data["act"] = act;
    ctx->saved_data["backend"] = backend;
    Tensor pre_out = save_preact ? pre : empty_like_none(x);
    ctx->mark_non_differentiable({pre_out});
    return {out, pre_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w_gate_up = saved[1], &w_down = saved[2], &offsets = saved[3], &pre = saved[4];
    const std::string act = ctx->saved_data["act"].toStringRef();
    const std::string backend = ctx->saved_data["backend"].toStringRef();
    const bool need_dx = ctx->needs_input_grad(0), need_dw = ctx->needs_input_grad(1) || ctx->needs_input_grad(2);
    const Tensor& grad = grads[0];
    Tensor dx, dwgu, dwd;
    {
      at::NoGradGuard no_grad;
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      if (backend == "cpu" && plain({&grad, &x, &w_gate_up, &w_down, &pre}))
        std::tie(dx, dwgu, dwd) =
            c_grouped_mlp_backward().call(grad, x, w_gate_up, w_down, offsets, pre, act, need_dx, need_dw);
      else
        std::tie(dx, dwgu, dwd) = grouped_mlp_backward_op().call(grad.contiguous(), x, w_gate_up, w_down, offsets,
                                                                 pre, act, need_dx, need_dw, backend);
    }
    variable_list out = {need_dx ? dx : Tensor(),
                         need_dw && ctx->needs_input_grad(1) ? dwgu : Tensor(),
                         need_dw && ctx->needs_input_grad(2) ? dwd : Tensor(),
                         Tensor(),
                         Tensor(),
                         Tensor(),
                         Tensor()};
    return once_differentiable(std::move(out), {grad, x, w_gate_up, w_down});
  }
};

std::tuple<Tensor, Tensor> grouped_mlp_autograd(const Tensor& x, const Tensor& w_gate_up, const Tensor& w_down,
                                                const Tensor& offsets, Str act, bool save_preact, Str backend) {
  if (!grad_wanted({&x, &w_gate_up, &w_down})) return grouped_mlp_below(x, w_gate_up, w_down, offsets, act,
                                                                        save_preact, backend);
  auto outs = GroupedMlpFn::apply(x, w_gate_up, w_down, offsets, std::string(act), save_preact, std::string(backend));
  return {outs[0], outs[1]};
}

// ==== activations ====================================================================================
Tensor unary_below(const Tensor& x, Str act, Str backend) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (native(backend) && plain({&x})) return c_unary_act().call(x, act);
  return unary_act_op().call(x, act, backend);
}

struct UnaryActFn : public torch::autograd::Function<UnaryActFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const std::string& act, const std::string& backend) {
    ctx->save_for_backward({x});
    ctx->saved_data["act"] = act;
    ctx->saved_data["backend"] = backend;
    return unary_below(x, act, backend);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor x = ctx->get_saved_variables()[0];
    const std::string act = ctx->saved_data["act"].toStringRef();
    const std::string backend = ctx->saved_data["backend"].toStringRef();
    Tensor dx;
    {
      at::NoGradGuard no_grad;
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      dx = native(backend) && plain({&grads[0], &x}) ? c_unary_act_backward().call(grads[0], x, act)
                                                     : unary_act_backward_op().call(grads[0], x, act, backend);
    }
    return once_differentiable({dx, Tensor(), Tensor()}, {grads[0], x});
  }
};

Tensor unary_act_autograd(const Tensor& x, Str act, Str backend) {
  if (!grad_wanted({&x})) return unary_below(x, act, backend);
  return UnaryActFn::apply(x, std::string(act), std::string(backend));
}

Tensor gated_below(const Tensor& gate, const Tensor& up, Str act, Str backend) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (native(backend) && plain({&gate, &up}))
    return viewed_as(c_gated_act().call(rows(gate), rows(up), act), gate);
  return gated_act_op().call(gate, up, act, backend);
}

struct GatedActFn : public torch::autograd::Function<GatedActFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& gate, const Tensor& up, const std::string& act,
                        const std::string& backend) {
    ctx->save_for_backward({gate, up});
    ctx->saved_data["act"] = act;
    ctx->saved_data["backend"] = backend;
    return gated_below(gate, up, act, backend);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &gate = saved[0], &up = saved[1];
    const std::string act = ctx->saved_data["act"].toStringRef();
    const std::string backend = ctx->saved_data["backend"].toStringRef();
    Tensor dgate, dup;
    {
      at::NoGradGuard no_grad;
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      if (native(backend) && plain({&grads[0], &gate, &up})) {
        std::tie(dgate, dup) =
            c_gated_act_backward().call(rows(grads[0].reshape(gate.sizes())), rows(gate), rows(up), act);
        dgate = viewed_as(dgate, gate);
        dup = viewed_as(dup, gate);
      } else {
        std::tie(dgate, dup) = gated_act_backward_op().call(grads[0], gate, up, act, backend);
      }
    }
    return once_differentiable({dgate, dup, Tensor(), Tensor()}, {grads[0], gate, up});
  }
};

Tensor gated_act_autograd(const Tensor& gate, const Tensor& up, Str act, Str backend) {
  if (!grad_wanted({&gate, &up})) return gated_below(gate, up, act, backend);
  return GatedActFn::apply(gate, up, std::string(act), std::string(backend));
}

// ==== int8_linear: inference only ====================================================================
Tensor int8_below(const Tensor& x, const Tensor& w, const Tensor& w_scale, const OptTensor& bias,
                  const OptTensor& smooth, Str act, Str mode, Str backend, const OptTensor& w_packed) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  // The CPU kernels directly (CUDA goes through the op, whose backend choice knows the CUDA kernel's rules).
  if (backend == "cpu" && plain({&x, &w, &w_scale, &or_undefined(bias), &or_undefined(smooth)})) {
    const int64_t N = w.size(0);
    const Tensor x2 = rows(x);
    Tensor y;
    if (x2.size(0) == 0) {
      y = at::empty({0, N}, x.options());
    } else {
      const int64_t code = act == "none" ? static_cast<int64_t>(Act::kNone)
                                         : static_cast<int64_t>(parse_act(std::string(act)));
      if (mode == "w8a8") {
        const bool grouped = w_scale.dim() == 2 && w_scale.size(1) > 1;
        const OptTensor packed = w_packed.has_value() && w_packed->numel() ? w_packed : std::nullopt;
        y = c_int8_w8a8().call(x2, w, grouped ? w_scale : w_scale.reshape({N}), bias, smooth, code, packed);
      } else {
        const Tensor xs = smooth.has_value() ? x2.mul(smooth->to(x2.scalar_type())) : x2;
        y = c_int8_w8a16().call(xs, w, w_scale, bias, code);
      }
    }
    return shaped_like(y, x);
  }
  return int8_linear_op().call(x, w, w_scale, bias, smooth, act, mode, backend, w_packed);
}

struct Int8LinearFn : public torch::autograd::Function<Int8LinearFn> {
  static Tensor forward(AutogradContext*, const Tensor& x, const Tensor& w, const Tensor& w_scale,
                        const OptTensor& bias, const OptTensor& smooth, const std::string& act,
                        const std::string& mode, const std::string& backend, const OptTensor& w_packed) {
    return int8_below(x, w, w_scale, bias, smooth, act, mode, backend, w_packed);
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "ember.ops.int8_linear is inference-only: it has no backward. Run it under torch.no_grad() / "
                "inference_mode, or keep the float layer for training.");
  }
};

Tensor int8_linear_autograd(const Tensor& x, const Tensor& w, const Tensor& w_scale, const OptTensor& bias,
                            const OptTensor& smooth, Str act, Str mode, Str backend, const OptTensor& w_packed) {
  if (!grad_wanted({&x, &or_undefined(bias), &or_undefined(smooth)}))
    return int8_below(x, w, w_scale, bias, smooth, act, mode, backend, w_packed);
  return Int8LinearFn::apply(x, w, w_scale, bias, smooth, std::string(act), std::string(mode), std::string(backend),
                             w_packed);
}

// ==== linear_cross_entropy: cross_entropy(x @ W^T + b, target) without the logits ====================
// Reduction mean / sum: the forward computes the gradients too (the upstream gradient of a scalar is one
// number, known only here in backward, which scales them): what is kept is dx, dW, db, not x or the
// logits. Reduction none: x, W, b and target are kept and the backward recomputes the logits per chunk.
std::tuple<Tensor, Tensor, Tensor, Tensor> lce_below(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                                     const Tensor& target, int64_t ignore_index, Str reduction,
                                                     double smoothing, bool need_dx, bool need_dw, bool need_db,
                                                     int64_t chunk_rows, Str backend) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (native(backend) && plain({&x, &weight, &or_undefined(bias), &target}))
    return c_lce().call(x, weight, bias, target, ignore_index, reduction, smoothing, need_dx, need_dw, need_db,
                        chunk_rows);
  return lce_op().call(x, weight, bias, target, ignore_index, reduction, smoothing, need_dx, need_dw, need_db,
                       chunk_rows, backend);
}

struct LinearCrossEntropyFn : public torch::autograd::Function<LinearCrossEntropyFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                               const Tensor& target, int64_t ignore_index, const std::string& reduction,
                               double smoothing, int64_t chunk_rows, const std::string& backend) {
    const bool need_dx = x.requires_grad(), need_dw = weight.requires_grad();
    const bool need_db = bias.has_value() && bias->requires_grad();
    const bool per_row = reduction == "none";
    auto [loss, dx, dw, db] = lce_below(x, weight, bias, target, ignore_index, reduction, smoothing,
                                        !per_row && need_dx, !per_row && need_dw, !per_row && need_db, chunk_rows,
                                        backend);
    if (per_row)
      ctx->save_for_backward({x, weight, or_undefined(bias), target});
    else
      ctx->save_for_backward({dx, dw, db});
    ctx->saved_data["per_row"] = per_row;
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["need"] = c10::List<bool>({need_dx, need_dw, need_db});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["smoothing"] = smoothing;
    ctx->saved_data["chunk_rows"] = chunk_rows;
    ctx->saved_data["backend"] = backend;
    const Tensor e = empty_like_none(x);
    Tensor e1 = e.clone(), e2 = e.clone(), e3 = e.clone();
    ctx->mark_non_differentiable({e1, e2, e3});
    return {loss, e1, e2, e3};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto need = ctx->saved_data["need"].toBoolList();
    const bool need_dx = need[0], need_dw = need[1], need_db = need[2];
    const Tensor& g = grads[0];
    Tensor dx, dw, db;
    {
      at::NoGradGuard no_grad;
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      if (!ctx->saved_data["per_row"].toBool()) {
        // The gradients of the loss itself, times the upstream gradient (a 0-d tensor). loss.backward()
        // gives 1: then they are handed on as they are, not copied (a copy of dW, the weight's size,
        // would double the op's peak memory). Reading g on the CPU is free; on a GPU it would stall the
        // stream, so there they are always multiplied, and so they are under tracing (torch.compile's
        // fake and functional tensors, vmap), where g has no value to read.
        const c10::DispatchKeySet traced({c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
                                          c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::FuncTorchGradWrapper});
        const bool one = g.device().is_cpu() && g.layout() == at::kStrided && !g.key_set().has_any(traced) &&
                         g.numel() == 1 && g.item<double>() == 1.0;
        auto times_g = [&](const Tensor& t) { return one ? t : at::mul(t, g.to(t.scalar_type())); };
        if (need_dx) dx = times_g(saved[0]);
        if (need_dw) dw = times_g(saved[1]);
        if (need_db) db = times_g(saved[2]);
      } else {
        const Tensor &x = saved[0], &weight = saved[1], &target = saved[3];
        const OptTensor bias = saved[2].defined() ? OptTensor(saved[2]) : std::nullopt;
        const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
        const double smoothing = ctx->saved_data["smoothing"].toDouble();
        const int64_t chunk_rows = ctx->saved_data["chunk_rows"].toInt();
        const std::string backend = ctx->saved_data["backend"].toStringRef();
        if (native(backend) && plain({&g, &x, &weight, &saved[2]}))
          std::tie(dx, dw, db) = c_lce_backward().call(g.contiguous(), x, weight, bias, target, ignore_index,
                                                       smoothing, need_dx, need_dw, need_db, chunk_rows);
        else
          std::tie(dx, dw, db) = lce_backward_op().call(g.contiguous(), x, weight, bias, target, ignore_index,
                                                        smoothing, need_dx, need_dw, need_db, chunk_rows, backend);
      }
    }
    variable_list out = {need_dx ? dx : Tensor(), need_dw ? dw : Tensor(), need_db ? db : Tensor(), Tensor(),
                         Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    return once_differentiable(std::move(out), {g});
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> lce_autograd(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                                        const Tensor& target, int64_t ignore_index, Str reduction,
                                                        double smoothing, bool need_dx, bool need_dw, bool need_db,
                                                        int64_t chunk_rows, Str backend) {
  if (!grad_wanted({&x, &weight, &or_undefined(bias)}))
    return lce_below(x, weight, bias, target, ignore_index, reduction, smoothing, need_dx, need_dw, need_db,
                     chunk_rows, backend);
  auto outs = LinearCrossEntropyFn::apply(x, weight, bias, target, ignore_index, std::string(reduction), smoothing,
                                          chunk_rows, std::string(backend));
  return {outs[0], outs[1], outs[2], outs[3]};
}

}  // namespace
}  // namespace ember::autograd

TORCH_LIBRARY_IMPL(ember, Autograd, m) {
  using namespace ember::autograd;
  m.impl("linear_act", &linear_autograd);
  m.impl("gated_linear", &gated_linear_autograd);
  m.impl("grouped_gated_mlp", &grouped_mlp_autograd);
  m.impl("unary_act", &unary_act_autograd);
  m.impl("gated_act", &gated_act_autograd);
  m.impl("int8_linear", &int8_linear_autograd);
  m.impl("linear_cross_entropy", &lce_autograd);
}
