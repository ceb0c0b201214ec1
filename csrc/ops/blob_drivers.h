// The blob loss family's drivers (ops/blob_drivers.cpp): the one accumulate pass shared by the
// losses and label_stats, and the forward and backward of the losses on a device's kernels
// (DeviceKernels, blob_ops.h), with the composite Dice+CE for devices whose kernels do not fuse
// it. The operator entry points (ops/blob_ops.cpp) call these.
#pragma once

#include <tuple>

#include "../common/glue.h"

namespace blob {
namespace detail {

// The one pass shared by the losses and label_stats: checks, label range, per-label sums.
struct Accumulated {
  at::Tensor stats;    // (B, C, K, 3 or 5) float64
  at::Tensor invalid;  // int32 scalar on the device (CUDA): an id outside [0, max_label] met
  LabelRange range;    // what the kernels read, the bound, the compacted ids (label_ids)
};

// The loss and coefficient table of a forward that DeviceKernels::forward may finish.
struct FusedForward {
  at::Tensor loss, coef;
  ForwardStatus status = kForwardNotHandled;
};

// `range_prm`: the op whose table sizes decide the label range (dense_for_bound); the composite
// Dice+CE accumulates Dice sums (prm) under Dice+CE's range. `fused`: the losses' forward, which
// the device's optional forward kernels may run in fewer launches.
Accumulated accumulate_stats(const DeviceKernels& kernels, const at::Tensor& input,
                             const at::Tensor& instances, const LossParams& prm, int64_t max_label,
                             const char* op, const LossParams* range_prm = nullptr,
                             FusedForward* fused = nullptr);

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_forward(const DeviceKernels& kernels,
                                                            const at::Tensor& input,
                                                            const at::Tensor& instances,
                                                            const LossParams& prm,
                                                            int64_t max_label, const char* op);

at::Tensor loss_backward(const DeviceKernels& kernels, const at::Tensor& grad_out,
                         const at::Tensor& input, const at::Tensor& instances,
                         const at::Tensor& coef, const at::Tensor& label_ids, const LossParams& prm,
                         const char* op);

}  // namespace detail
}  // namespace blob
