// Autograd of the blob losses, in C++ (registered for the Autograd key), so that a training
// step runs no Python between the user's call and the kernels.
//
// blob::dice / blob::tversky: forward calls the private op blob::_dice_forward (below the
// Autograd key, so it reaches the device kernel or, under torch.compile, the fake kernel),
// which returns the loss with the per-label coefficient table and the compacted ids; backward
// is one call of blob::_dice_backward with those. Only the loss is an output: the table and the
// ids are saved for the backward and never seen by the user.
//
// The backward ops have an Autograd kernel too, whose own backward raises: the backward pass is
// not differentiable here (the coefficient table depends on the input), and a silent zero
// would give wrong Hessian-vector products (torchvision's ops raise the same way).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>

namespace blob {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;
using ForwardOut = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

using DiceForwardSig = ForwardOut(const at::Tensor&, const at::Tensor&, double, double,
                                  c10::string_view, c10::string_view, bool, double, double,
                                  int64_t);
using TverskyForwardSig = ForwardOut(const at::Tensor&, const at::Tensor&, double, double,
                                     c10::string_view, c10::string_view, double, double, double,
                                     double, int64_t);
using DiceBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, c10::string_view, bool);
using TverskyBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, const at::Tensor&, c10::string_view);

using DiceCEForwardSig = ForwardOut(const at::Tensor&, const at::Tensor&, double, double, double,
                                    double, c10::string_view, c10::string_view, bool, double,
                                    double, int64_t);

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

const c10::TypedOperatorHandle<DiceForwardSig>& dice_forward_op() {
  static const auto op = find_op<DiceForwardSig>("blob::_dice_forward");
  return op;
}
const c10::TypedOperatorHandle<TverskyForwardSig>& tversky_forward_op() {
  static const auto op = find_op<TverskyForwardSig>("blob::_tversky_forward");
  return op;
}
const c10::TypedOperatorHandle<DiceBackwardSig>& dice_backward_op() {
  static const auto op = find_op<DiceBackwardSig>("blob::_dice_backward");
  return op;
}
const c10::TypedOperatorHandle<TverskyBackwardSig>& tversky_backward_op() {
  static const auto op = find_op<TverskyBackwardSig>("blob::_tversky_backward");
  return op;
}

const c10::TypedOperatorHandle<DiceCEForwardSig>& dice_ce_forward_op() {
  static const auto op = find_op<DiceCEForwardSig>("blob::_dice_ce_forward");
  return op;
}
const c10::TypedOperatorHandle<DiceBackwardSig>& dice_ce_backward_op() {
  static const auto op = find_op<DiceBackwardSig>("blob::_dice_ce_backward");
  return op;
}

[[noreturn]] void no_double_backward(const char* op) {
  TORCH_CHECK(false, op,
              ": double backward is not supported (the backward pass of blob loss is not "
              "differentiable here). Compute higher-order gradients with the reference "
              "blobbench.naive_blob_loss or blobbench.vectorized_blob_loss instead.");
}

// What the backward of blob::dice and blob::dice_ce needs from their forward (the private forward
// op's outputs: loss, coefficient table, compacted ids); returns the loss.
variable_list dice_like_save(AutogradContext* ctx, const Variable& input, const Variable& instances,
                             const ForwardOut& out, c10::string_view activation,
                             bool squared_pred) {
  ctx->save_for_backward({input, instances, std::get<1>(out), std::get<2>(out)});
  ctx->saved_data["activation"] = std::string(activation);
  ctx->saved_data["squared_pred"] = squared_pred;
  return {std::get<0>(out)};
}

// The backward of blob::dice and blob::dice_ce: one call of their backward op with what the
// forward saved. Through the backward op's Autograd kernel only when a graph of the backward is
// being recorded (create_graph=True), so that a double backward raises; else straight below it.
// Returns the gradient of the input and none for the op's other n_args - 1 arguments.
variable_list dice_like_backward(AutogradContext* ctx, const variable_list& grad,
                                 const c10::TypedOperatorHandle<DiceBackwardSig>& op,
                                 size_t n_args) {
  const auto saved = ctx->get_saved_variables();
  c10::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
  if (!at::GradMode::is_enabled()) below_autograd.emplace();
  variable_list out(n_args);
  out[0] = op.call(grad[0], saved[0], saved[1], saved[2], saved[3],
                   ctx->saved_data["activation"].toStringRef(),
                   ctx->saved_data["squared_pred"].toBool());
  return out;
}

// The Autograd kernel of the backward ops _dice_backward and _dice_ce_backward: their own
// backward raises (no double backward).
using DiceBackwardOpGetter = const c10::TypedOperatorHandle<DiceBackwardSig>& (*)();
template <DiceBackwardOpGetter Op, const char* Name>
class DiceBackwardOpFunction : public torch::autograd::Function<DiceBackwardOpFunction<Op, Name>> {
 public:
  static variable_list forward(AutogradContext* /*ctx*/, const Variable& grad,
                               const Variable& input, const Variable& instances,
                               const Variable& coef, const Variable& label_ids,
                               c10::string_view activation, bool squared_pred) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return {Op().call(grad, input, instances, coef, label_ids, activation, squared_pred)};
  }
  static variable_list backward(AutogradContext* /*ctx*/, variable_list /*grad*/) {
    no_double_backward(Name);
  }
  static at::Tensor apply_op(const at::Tensor& grad, const at::Tensor& input,
                             const at::Tensor& instances, const at::Tensor& coef,
                             const at::Tensor& label_ids, c10::string_view activation,
                             bool squared_pred) {
    return DiceBackwardOpFunction::apply(grad, input, instances, coef, label_ids, activation,
                                         squared_pred)[0];
  }
};

constexpr char kDiceName[] = "blob.dice";
constexpr char kDiceCEName[] = "blob.dice_ce";

// ---- blob::dice ------------------------------------------------------------------------------

class DiceFunction : public torch::autograd::Function<DiceFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Variable& input,
                               const Variable& instances, double alpha, double beta,
                               c10::string_view activation, c10::string_view masking,
                               bool squared_pred, double smooth_nr, double smooth_dr,
                               int64_t max_label) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto out = dice_forward_op().call(input, instances, alpha, beta, activation, masking,
                                      squared_pred, smooth_nr, smooth_dr, max_label);
    return dice_like_save(ctx, input, instances, out, activation, squared_pred);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    return dice_like_backward(ctx, grad, dice_backward_op(), 10);
  }
};

at::Tensor dice_autograd(const at::Tensor& input, const at::Tensor& instances, double alpha,
                         double beta, c10::string_view activation, c10::string_view masking,
                         bool squared_pred, double smooth_nr, double smooth_dr, int64_t max_label) {
  return DiceFunction::apply(input, instances, alpha, beta, activation, masking, squared_pred,
                             smooth_nr, smooth_dr, max_label)[0];
}

// ---- blob::tversky ---------------------------------------------------------------------------

class TverskyFunction : public torch::autograd::Function<TverskyFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Variable& input,
                               const Variable& instances, double alpha, double beta,
                               c10::string_view activation, c10::string_view masking,
                               double fp_weight, double fn_weight, double smooth_nr,
                               double smooth_dr, int64_t max_label) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto out = tversky_forward_op().call(input, instances, alpha, beta, activation, masking,
                                         fp_weight, fn_weight, smooth_nr, smooth_dr, max_label);
    ctx->save_for_backward({input, instances, std::get<1>(out), std::get<2>(out)});
    ctx->saved_data["activation"] = std::string(activation);
    return {std::get<0>(out)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    const auto saved = ctx->get_saved_variables();
    c10::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
    if (!at::GradMode::is_enabled()) below_autograd.emplace();
    const auto grad_input =
        tversky_backward_op().call(grad[0], saved[0], saved[1], saved[2], saved[3],
                                   ctx->saved_data["activation"].toStringRef());
    return {grad_input, Variable(), Variable(), Variable(), Variable(), Variable(),
            Variable(), Variable(), Variable(), Variable(), Variable()};
  }
};

class TverskyBackwardFunction : public torch::autograd::Function<TverskyBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* /*ctx*/, const Variable& grad,
                               const Variable& input, const Variable& instances,
                               const Variable& coef, const Variable& label_ids,
                               c10::string_view activation) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return {tversky_backward_op().call(grad, input, instances, coef, label_ids, activation)};
  }
  static variable_list backward(AutogradContext* /*ctx*/, variable_list /*grad*/) {
    no_double_backward("blob.tversky");
  }
};

at::Tensor tversky_autograd(const at::Tensor& input, const at::Tensor& instances, double alpha,
                            double beta, c10::string_view activation, c10::string_view masking,
                            double fp_weight, double fn_weight, double smooth_nr, double smooth_dr,
                            int64_t max_label) {
  return TverskyFunction::apply(input, instances, alpha, beta, activation, masking, fp_weight,
                                fn_weight, smooth_nr, smooth_dr, max_label)[0];
}

at::Tensor tversky_backward_autograd(const at::Tensor& grad, const at::Tensor& input,
                                     const at::Tensor& instances, const at::Tensor& coef,
                                     const at::Tensor& label_ids, c10::string_view activation) {
  return TverskyBackwardFunction::apply(grad, input, instances, coef, label_ids, activation)[0];
}

// ---- blob::dice_ce ---------------------------------------------------------------------------

class DiceCEFunction : public torch::autograd::Function<DiceCEFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Variable& input,
                               const Variable& instances, double alpha, double beta,
                               double lambda_dice, double lambda_ce, c10::string_view activation,
                               c10::string_view masking, bool squared_pred, double smooth_nr,
                               double smooth_dr, int64_t max_label) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto out =
        dice_ce_forward_op().call(input, instances, alpha, beta, lambda_dice, lambda_ce, activation,
                                  masking, squared_pred, smooth_nr, smooth_dr, max_label);
    return dice_like_save(ctx, input, instances, out, activation, squared_pred);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    return dice_like_backward(ctx, grad, dice_ce_backward_op(), 12);
  }
};

at::Tensor dice_ce_autograd(const at::Tensor& input, const at::Tensor& instances, double alpha,
                            double beta, double lambda_dice, double lambda_ce,
                            c10::string_view activation, c10::string_view masking,
                            bool squared_pred, double smooth_nr, double smooth_dr,
                            int64_t max_label) {
  return DiceCEFunction::apply(input, instances, alpha, beta, lambda_dice, lambda_ce, activation,
                               masking, squared_pred, smooth_nr, smooth_dr, max_label)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(blob, Autograd, m) {
  m.impl("dice", &dice_autograd);
  m.impl("tversky", &tversky_autograd);
  m.impl("_dice_backward", &DiceBackwardOpFunction<&dice_backward_op, kDiceName>::apply_op);
  m.impl("_tversky_backward", &tversky_backward_autograd);
  m.impl("dice_ce", &dice_ce_autograd);
  m.impl("_dice_ce_backward", &DiceBackwardOpFunction<&dice_ce_backward_op, kDiceCEName>::apply_op);
}

}  // namespace blob
