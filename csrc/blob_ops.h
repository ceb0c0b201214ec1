// Device-independent glue of the blob loss operators: argument checking, the label range, and
// the three kernels each device provides (accumulate, finalize, backward).
#pragma once

#include <torch/torch.h>

#include <string>
#include <tuple>

#include "blob_loss_math.h"

namespace blob {

// The kernels one device provides. Tensors are contiguous and on that device.
struct DeviceKernels {
  // input (B, C, V) floating, labels (B, C, V) integer in [0, K) -> stats (B, C, K, 3) float64,
  // zero-initialised by the caller. Labels outside [0, K) are never read out of bounds: the CPU
  // raises; the CUDA kernel sets `invalid` (int32 scalar on the device), which turns the loss
  // and the gradient into NaN so that sync-free calls cannot hide them.
  void (*accumulate)(const at::Tensor& input, const at::Tensor& labels, const LossParams& prm,
                     int64_t K, at::Tensor& stats, at::Tensor& invalid);
  // stats -> loss (0-dim, float64) and coef (B, C, K, 2) float64.
  void (*finalize)(const at::Tensor& stats, const at::Tensor& invalid, const LossParams& prm,
                   at::Tensor& loss, at::Tensor& coef);
  // One pass: grad_input = grad_out * (a[l] + b[l] dpow(p)) * act'(x).
  void (*backward)(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& labels,
                   const at::Tensor& coef, const LossParams& prm, at::Tensor& grad_input);
};

// Serial finalisation on host memory (CPU kernel, and the reference for the CUDA one).
void finalize_host(const double* stats, int64_t B, int64_t C, int64_t K, const LossParams& prm,
                   double* loss, double* coef);

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_forward(
    const DeviceKernels& kernels, const at::Tensor& input, const at::Tensor& instances,
    const LossParams& prm, int64_t max_label, const char* op_name);

at::Tensor loss_backward(const DeviceKernels& kernels, const at::Tensor& grad_out,
                         const at::Tensor& input, const at::Tensor& instances,
                         const at::Tensor& coef, const at::Tensor& label_ids,
                         const LossParams& prm, const char* op_name);

// What the device registrations call, with their kernels.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dice_forward_with(
    const DeviceKernels& k, const at::Tensor& input, const at::Tensor& instances, double alpha,
    double beta, c10::string_view activation, c10::string_view masking, bool squared_pred,
    double smooth_nr, double smooth_dr, int64_t max_label);
std::tuple<at::Tensor, at::Tensor, at::Tensor> tversky_forward_with(
    const DeviceKernels& k, const at::Tensor& input, const at::Tensor& instances, double alpha,
    double beta, c10::string_view activation, c10::string_view masking, double fp_weight,
    double fn_weight, double smooth_nr, double smooth_dr, int64_t max_label);
// Per-label sums (B, C, K, 3) = (sum p, sum p^q, count) and the compacted ids (empty unless
// compacted); NaN where the CUDA kernel met an id above max_label.
std::tuple<at::Tensor, at::Tensor> label_stats_with(const DeviceKernels& k, const at::Tensor& input,
                                                    const at::Tensor& instances,
                                                    c10::string_view activation,
                                                    bool squared_pred, int64_t max_label);

at::Tensor backward_with(const DeviceKernels& k, const at::Tensor& grad, const at::Tensor& input,
                         const at::Tensor& instances, const at::Tensor& coef,
                         const at::Tensor& label_ids, c10::string_view activation,
                         bool squared_pred);

// Registers dice_forward, dice_backward, tversky_forward and tversky_backward for one
// dispatch key with that device's kernels.
#define BLOB_REGISTER_DEVICE(KEY, KERNELS)                                                     \
  namespace {                                                                                  \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> KEY##_dice_forward(                           \
      const at::Tensor& input, const at::Tensor& instances, double alpha, double beta,         \
      c10::string_view activation, c10::string_view masking, bool squared_pred,                \
      double smooth_nr, double smooth_dr, int64_t max_label) {                                 \
    return ::blob::dice_forward_with(KERNELS, input, instances, alpha, beta, activation,       \
                                     masking, squared_pred, smooth_nr, smooth_dr, max_label);  \
  }                                                                                            \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> KEY##_tversky_forward(                        \
      const at::Tensor& input, const at::Tensor& instances, double alpha, double beta,         \
      c10::string_view activation, c10::string_view masking, double fp_weight,                 \
      double fn_weight, double smooth_nr, double smooth_dr, int64_t max_label) {               \
    return ::blob::tversky_forward_with(KERNELS, input, instances, alpha, beta, activation,    \
                                        masking, fp_weight, fn_weight, smooth_nr, smooth_dr,   \
                                        max_label);                                            \
  }                                                                                            \
  at::Tensor KEY##_dice_backward(const at::Tensor& grad, const at::Tensor& input,              \
                                 const at::Tensor& instances, const at::Tensor& coef,          \
                                 const at::Tensor& label_ids, c10::string_view activation,     \
                                 bool squared_pred) {                                          \
    return ::blob::backward_with(KERNELS, grad, input, instances, coef, label_ids, activation,  \
                                 squared_pred);                                                \
  }                                                                                            \
  at::Tensor KEY##_tversky_backward(const at::Tensor& grad, const at::Tensor& input,           \
                                    const at::Tensor& instances, const at::Tensor& coef,       \
                                    const at::Tensor& label_ids, c10::string_view activation) { \
    return ::blob::backward_with(KERNELS, grad, input, instances, coef, label_ids, activation,  \
                                 false);                                                       \
  }                                                                                            \
  std::tuple<at::Tensor, at::Tensor> KEY##_label_stats(                                        \
      const at::Tensor& input, const at::Tensor& instances, c10::string_view activation,       \
      bool squared_pred, int64_t max_label) {                                                  \
    return ::blob::label_stats_with(KERNELS, input, instances, activation, squared_pred,       \
                                    max_label);                                                \
  }                                                                                            \
  }                                                                                            \
  TORCH_LIBRARY_IMPL(blob, KEY, m) {                                                           \
    m.impl("dice_forward", &KEY##_dice_forward);                                               \
    m.impl("dice_backward", &KEY##_dice_backward);                                             \
    m.impl("tversky_forward", &KEY##_tversky_forward);                                         \
    m.impl("tversky_backward", &KEY##_tversky_backward);                                       \
    m.impl("label_stats", &KEY##_label_stats);                                                 \
  }

// Error-message formatting without std::ostream number formatting: on one GPU machine's image
// (torch 2.11, Python 3.12) a TORCH_CHECK that streamed an integer crashed the process, while
// string-only messages worked. std::to_string avoids the locale facets involved.
std::string num(int64_t v);
std::string shape(at::IntArrayRef sizes);

// The largest label range kept as a dense table; larger ranges are compacted with a sort.
int64_t dense_label_limit(int64_t voxels_per_plane);

}  // namespace blob
