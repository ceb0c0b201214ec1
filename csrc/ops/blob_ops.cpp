// Schemas and entry points of the blob loss operators.
//
// Public operators: blob::dice, blob::tversky (the losses) and blob::label_stats (the per-label
// sums). Private operators (leading underscore, as torchvision names its backward ops):
// blob::_dice_forward / blob::_tversky_forward return the loss together with the per-label
// coefficient table the one-pass backward needs and the compacted label ids;
// blob::_dice_backward / blob::_tversky_backward are that backward. Autograd is C++
// (autograd/blob_autograd.cpp): the public losses call the private forward op below the
// Autograd key and the private backward op in their backward, so no Python runs per call.
// Each device registers its kernels for every op in its own TORCH_LIBRARY_IMPL block
// (cpu/blob_loss_kernel.cpp, cuda/blob_loss_kernel.cu); the fake kernels are in
// blobbench/_ops.py. The drivers are in ops/blob_drivers.cpp, the machinery they share with the
// other families in common/.

#include "blob_drivers.h"

#include <limits>
#include <string>

namespace blob {

using namespace detail;

// ---- what the device registrations call ---------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> dice_forward(
    const DeviceKernels& k, const at::Tensor& input, const at::Tensor& instances, double alpha,
    double beta, c10::string_view activation, c10::string_view masking, bool squared_pred,
    double smooth_nr, double smooth_dr, int64_t max_label) {
  const char* op = "blob.dice";
  auto prm = make_params(kDice, alpha, beta, std::string(activation), std::string(masking),
                         squared_pred, smooth_nr, smooth_dr, 0.0, 0.0, op);
  return loss_forward(k, input, instances, prm, max_label, op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tversky_forward(
    const DeviceKernels& k, const at::Tensor& input, const at::Tensor& instances, double alpha,
    double beta, c10::string_view activation, c10::string_view masking, double fp_weight,
    double fn_weight, double smooth_nr, double smooth_dr, int64_t max_label) {
  const char* op = "blob.tversky";
  auto prm = make_params(kTversky, alpha, beta, std::string(activation), std::string(masking),
                         false, smooth_nr, smooth_dr, fp_weight, fn_weight, op);
  return loss_forward(k, input, instances, prm, max_label, op);
}

at::Tensor dice_backward(const DeviceKernels& k, const at::Tensor& grad, const at::Tensor& input,
                         const at::Tensor& instances, const at::Tensor& coef,
                         const at::Tensor& label_ids, c10::string_view activation,
                         bool squared_pred) {
  const char* op = "blob.dice (backward)";
  LossParams prm{};
  prm.kind = kDice;
  prm.activation = parse_activation(std::string(activation), op);
  prm.squared_pred = squared_pred;
  return loss_backward(k, grad, input, instances, coef, label_ids, prm, op);
}

at::Tensor tversky_backward(const DeviceKernels& k, const at::Tensor& grad, const at::Tensor& input,
                            const at::Tensor& instances, const at::Tensor& coef,
                            const at::Tensor& label_ids, c10::string_view activation) {
  const char* op = "blob.tversky (backward)";
  LossParams prm{};
  prm.kind = kTversky;
  prm.activation = parse_activation(std::string(activation), op);
  prm.squared_pred = false;
  return loss_backward(k, grad, input, instances, coef, label_ids, prm, op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dice_ce_forward(
    const DeviceKernels& k, const at::Tensor& input, const at::Tensor& instances, double alpha,
    double beta, double lambda_dice, double lambda_ce, c10::string_view activation,
    c10::string_view masking, bool squared_pred, double smooth_nr, double smooth_dr,
    int64_t max_label) {
  const char* op = "blob.dice_ce";
  auto prm = make_params(kDice, alpha, beta, std::string(activation), std::string(masking),
                         squared_pred, smooth_nr, smooth_dr, 0.0, 0.0, op);
  TORCH_CHECK_VALUE(prm.activation != kSoftmax, op,
                    ": activation=\"softmax\" is not supported: blob Dice+CE takes one binary "
                    "cross-entropy per channel and per instance (activation \"sigmoid\" or "
                    "\"none\"); use blob.dice with softmax, or one sigmoid channel per class");
  TORCH_CHECK_VALUE(lambda_dice >= 0.0 && lambda_ce >= 0.0, op,
                    ": `lambda_dice` and `lambda_ce` must be >= 0, got ",
                    std::to_string(lambda_dice), " and ", std::to_string(lambda_ce));
  prm.with_ce = true;
  prm.lambda_dice = lambda_dice;
  prm.lambda_ce = lambda_ce;
  if (input.dim() >= 2 && input.numel() > 0) {
    prm.inv_voxels = double(input.size(0) * input.size(1)) / double(input.numel());
  }
  auto out = loss_forward(k, input, instances, prm, max_label, op);
  if (prm.activation == kNoActivation) {
    // The cross-entropy of probabilities is defined on [0, 1] (torch's binary_cross_entropy
    // raises outside). The CPU raises; CUDA cannot without a sync and makes the result NaN.
    at::Tensor bad = at::logical_or(input.lt(0), input.gt(1)).any();
    if (!k.uses_invalid_flag) {
      TORCH_CHECK_VALUE(!bad.item<bool>(), op,
                        ": with activation=\"none\" `input` must hold probabilities in [0, 1] "
                        "(the domain of the binary cross-entropy), found values outside");
    } else {
      const double nan = std::numeric_limits<double>::quiet_NaN();
      std::get<0>(out).masked_fill_(bad, nan);
      std::get<1>(out).masked_fill_(bad, nan);
    }
  }
  return out;
}

at::Tensor dice_ce_backward(const DeviceKernels& k, const at::Tensor& grad, const at::Tensor& input,
                            const at::Tensor& instances, const at::Tensor& coef,
                            const at::Tensor& label_ids, c10::string_view activation,
                            bool squared_pred) {
  const char* op = "blob.dice_ce (backward)";
  LossParams prm{};
  prm.kind = kDice;
  prm.activation = parse_activation(std::string(activation), op);
  TORCH_CHECK_VALUE(prm.activation != kSoftmax, op,
                    ": activation=\"softmax\" is not supported by blob Dice+CE");
  prm.squared_pred = squared_pred;
  prm.with_ce = true;
  return loss_backward(k, grad, input, instances, coef, label_ids, prm, op);
}

std::tuple<at::Tensor, at::Tensor> label_stats(const DeviceKernels& k, const at::Tensor& input,
                                               const at::Tensor& instances,
                                               c10::string_view activation, bool squared_pred,
                                               int64_t max_label) {
  const char* op = "blob.label_stats";
  // The sums do not depend on the loss kind, weights or masking: Dice parameters with the
  // default masking select the accumulation (activation, squared_pred).
  auto prm = make_params(kDice, 1.0, 1.0, std::string(activation), "paper", squared_pred, 0.0, 0.0,
                         0.0, 0.0, op);
  Accumulated a = accumulate_stats(k, input, instances, prm, max_label, op);
  // An id above max_label on CUDA (no sync to raise): make the result unmistakable, as the loss.
  if (a.invalid.defined()) {
    a.stats.masked_fill_(a.invalid.ne(0), std::numeric_limits<double>::quiet_NaN());
  }
  return {widen_table(a.stats, a.range.out_K), a.range.label_ids};
}

TORCH_LIBRARY_FRAGMENT(blob, m) {
  // Public operators.
  m.def(
      "dice(Tensor input, Tensor instances, float alpha=2.0, float beta=1.0, *, "
      "str activation=\"sigmoid\", str masking=\"paper\", bool squared_pred=False, "
      "float smooth_nr=1e-5, float smooth_dr=1e-5, int max_label=-1) -> Tensor");
  m.def(
      "tversky(Tensor input, Tensor instances, float alpha=2.0, float beta=1.0, *, "
      "str activation=\"sigmoid\", str masking=\"paper\", float fp_weight=0.3, "
      "float fn_weight=0.7, float smooth_nr=1e-5, float smooth_dr=1e-5, int max_label=-1) "
      "-> Tensor");
  m.def(
      "label_stats(Tensor input, Tensor instances, *, str activation=\"sigmoid\", "
      "bool squared_pred=False, int max_label=-1) -> (Tensor, Tensor)");
  // Private operators: the losses' forward with what the backward needs, and the backward.
  m.def(
      "_dice_forward(Tensor input, Tensor instances, float alpha, float beta, str activation, "
      "str masking, bool squared_pred, float smooth_nr, float smooth_dr, int max_label) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "_dice_backward(Tensor grad, Tensor input, Tensor instances, Tensor coef, Tensor label_ids, "
      "str activation, bool squared_pred) -> Tensor");
  m.def(
      "_tversky_forward(Tensor input, Tensor instances, float alpha, float beta, str activation, "
      "str masking, float fp_weight, float fn_weight, float smooth_nr, float smooth_dr, "
      "int max_label) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_tversky_backward(Tensor grad, Tensor input, Tensor instances, Tensor coef, "
      "Tensor label_ids, str activation) -> Tensor");
  // Blob Dice+CE: every term lambda_dice * Dice + lambda_ce * binary cross-entropy.
  m.def(
      "dice_ce(Tensor input, Tensor instances, float alpha=2.0, float beta=1.0, *, "
      "float lambda_dice=1.0, float lambda_ce=1.0, str activation=\"sigmoid\", "
      "str masking=\"paper\", bool squared_pred=False, float smooth_nr=1e-5, "
      "float smooth_dr=1e-5, int max_label=-1) -> Tensor");
  m.def(
      "_dice_ce_forward(Tensor input, Tensor instances, float alpha, float beta, "
      "float lambda_dice, float lambda_ce, str activation, str masking, bool squared_pred, "
      "float smooth_nr, float smooth_dr, int max_label) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_dice_ce_backward(Tensor grad, Tensor input, Tensor instances, Tensor coef, "
      "Tensor label_ids, str activation, bool squared_pred) -> Tensor");
}

}  // namespace blob
