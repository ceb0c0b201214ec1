// Autograd of the component-wise losses blob::cc_dice / blob::cc_dice_ce, in C++ like the blob
// losses' (blob_autograd.cpp): the forward calls the private forward op below the Autograd key
// (the device kernel, or under torch.compile the fake), saves the coefficient table and the
// compacted ids, and the backward is one call of the private backward op. The backward ops'
// own Autograd kernels raise on a double backward.
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

using CCDiceForwardSig = ForwardOut(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    double, double, c10::string_view, bool, double, double,
                                    int64_t);
using CCDiceCEForwardSig = ForwardOut(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      double, double, double, double, c10::string_view, bool,
                                      double, double, int64_t);
using CCBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 c10::string_view, bool);

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

const c10::TypedOperatorHandle<CCDiceForwardSig>& cc_dice_forward_op() {
  static const auto op = find_op<CCDiceForwardSig>("blob::_cc_dice_forward");
  return op;
}
const c10::TypedOperatorHandle<CCDiceCEForwardSig>& cc_dice_ce_forward_op() {
  static const auto op = find_op<CCDiceCEForwardSig>("blob::_cc_dice_ce_forward");
  return op;
}
const c10::TypedOperatorHandle<CCBackwardSig>& cc_dice_backward_op() {
  static const auto op = find_op<CCBackwardSig>("blob::_cc_dice_backward");
  return op;
}
const c10::TypedOperatorHandle<CCBackwardSig>& cc_dice_ce_backward_op() {
  static const auto op = find_op<CCBackwardSig>("blob::_cc_dice_ce_backward");
  return op;
}

variable_list save(AutogradContext* ctx, const Variable& input, const Variable& instances,
                   const Variable& regions, const ForwardOut& out, c10::string_view activation,
                   bool squared_pred) {
  ctx->save_for_backward({input, instances, regions, std::get<1>(out), std::get<2>(out)});
  ctx->saved_data["activation"] = std::string(activation);
  ctx->saved_data["squared_pred"] = squared_pred;
  return {std::get<0>(out)};
}

// One call of the backward op; through its Autograd kernel only while a graph of the backward is
// recorded (create_graph=True), so that a double backward raises.
variable_list run_backward(AutogradContext* ctx, const variable_list& grad,
                           const c10::TypedOperatorHandle<CCBackwardSig>& op, size_t n_args) {
  const auto saved = ctx->get_saved_variables();
  c10::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
  if (!at::GradMode::is_enabled()) below_autograd.emplace();
  variable_list out(n_args);
  out[0] = op.call(grad[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                   ctx->saved_data["activation"].toStringRef(),
                   ctx->saved_data["squared_pred"].toBool());
  return out;
}

class CCDiceFunction : public torch::autograd::Function<CCDiceFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Variable& input,
                               const Variable& instances, const Variable& regions, double alpha,
                               double beta, c10::string_view activation, bool squared_pred,
                               double smooth_nr, double smooth_dr, int64_t max_label) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto out = cc_dice_forward_op().call(input, instances, regions, alpha, beta, activation,
                                         squared_pred, smooth_nr, smooth_dr, max_label);
    return save(ctx, input, instances, regions, out, activation, squared_pred);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    return run_backward(ctx, grad, cc_dice_backward_op(), 10);
  }
};

class CCDiceCEFunction : public torch::autograd::Function<CCDiceCEFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Variable& input,
                               const Variable& instances, const Variable& regions, double alpha,
                               double beta, double lambda_dice, double lambda_ce,
                               c10::string_view activation, bool squared_pred, double smooth_nr,
                               double smooth_dr, int64_t max_label) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto out = cc_dice_ce_forward_op().call(input, instances, regions, alpha, beta, lambda_dice,
                                            lambda_ce, activation, squared_pred, smooth_nr,
                                            smooth_dr, max_label);
    return save(ctx, input, instances, regions, out, activation, squared_pred);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    return run_backward(ctx, grad, cc_dice_ce_backward_op(), 12);
  }
};

at::Tensor cc_dice_autograd(const at::Tensor& input, const at::Tensor& instances,
                            const at::Tensor& regions, double alpha, double beta,
                            c10::string_view activation, bool squared_pred, double smooth_nr,
                            double smooth_dr, int64_t max_label) {
  return CCDiceFunction::apply(input, instances, regions, alpha, beta, activation, squared_pred,
                               smooth_nr, smooth_dr, max_label)[0];
}

at::Tensor cc_dice_ce_autograd(const at::Tensor& input, const at::Tensor& instances,
                               const at::Tensor& regions, double alpha, double beta,
                               double lambda_dice, double lambda_ce, c10::string_view activation,
                               bool squared_pred, double smooth_nr, double smooth_dr,
                               int64_t max_label) {
  return CCDiceCEFunction::apply(input, instances, regions, alpha, beta, lambda_dice, lambda_ce,
                                 activation, squared_pred, smooth_nr, smooth_dr, max_label)[0];
}

// The Autograd kernel of the backward ops: their own backward raises (no double backward).
using BackwardOpGetter = const c10::TypedOperatorHandle<CCBackwardSig>& (*)();
template <BackwardOpGetter Op, const char* Name>
class CCBackwardOpFunction : public torch::autograd::Function<CCBackwardOpFunction<Op, Name>> {
 public:
  static variable_list forward(AutogradContext* /*ctx*/, const Variable& grad,
                               const Variable& input, const Variable& instances,
                               const Variable& regions, const Variable& coef,
                               const Variable& label_ids, c10::string_view activation,
                               bool squared_pred) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return {Op().call(grad, input, instances, regions, coef, label_ids, activation, squared_pred)};
  }
  static variable_list backward(AutogradContext* /*ctx*/, variable_list /*grad*/) {
    TORCH_CHECK(false, Name,
                ": double backward is not supported (the backward pass of the CC loss is not "
                "differentiable here). Compute higher-order gradients with the reference "
                "blobbench.naive_cc_dice / naive_cc_dice_ce instead.");
    return {};
  }
  static at::Tensor apply_op(const at::Tensor& grad, const at::Tensor& input,
                             const at::Tensor& instances, const at::Tensor& regions,
                             const at::Tensor& coef, const at::Tensor& label_ids,
                             c10::string_view activation, bool squared_pred) {
    return CCBackwardOpFunction::apply(grad, input, instances, regions, coef, label_ids,
                                       activation, squared_pred)[0];
  }
};

constexpr char kCCDiceName[] = "blob.cc_dice";
constexpr char kCCDiceCEName[] = "blob.cc_dice_ce";

}  // namespace

TORCH_LIBRARY_IMPL(blob, Autograd, m) {
  m.impl("cc_dice", &cc_dice_autograd);
  m.impl("cc_dice_ce", &cc_dice_ce_autograd);
  m.impl("_cc_dice_backward",
         &CCBackwardOpFunction<&cc_dice_backward_op, kCCDiceName>::apply_op);
  m.impl("_cc_dice_ce_backward",
         &CCBackwardOpFunction<&cc_dice_ce_backward_op, kCCDiceCEName>::apply_op);
}

}  // namespace blob
