// The component-wise (Voronoi) loss family: blob::cc_dice and blob::cc_dice_ce (issue 20,
// docs/design.md). Every voxel belongs to the region of its nearest instance (`regions`, same
// shape, dtype and device as `instances`; blobbench.voronoi_regions). Per (b, c) plane with
// instances and per region k, over the voxels of region k, with t = [instances > 0]:
//   I_k = sum p t, P_k = sum p^q, T_k = sum t, N_k = count, E_k = sum BCE(p, t)
//   Dice_k = 1 - (2 I_k + nr) / (P_k + T_k + dr),  CE_k = E_k / N_k,
//   term_k = lambda_dice Dice_k + lambda_ce CE_k (cc_dice: Dice_k).
// The plane's global term is the same closed form on the plane's totals (the blob ops' global
// term), so one pass over the voxels gives both; the loss is alpha * global + beta * cc, reduced
// over planes and batch elements as blob loss is (combine_planes, blob_loss_math.h).
//
// Tables: stats (B, C, K, 4 or 5) float64, columns (I, P, T, N[, E]); coefficients (B, C, K,
// 2 or 3), columns (a, b[, e]): dL/dp_i = a[r_i] t_i + b[r_i] q p_i^(q-1) (+ e[r_i] times the
// BCE's derivative: (p - t) in x for sigmoid (BCE with logits), torch's dBCE/dp for "none").
//
// Devices: the CPU runs fused kernels (cpu/cc_loss_kernel.cpp: one accumulate pass, one backward
// pass, on the blob kernels' row drivers); every other device runs a composite of ATen ops
// (ops/cc_composite.cpp), which BLOBBENCH_CC=composite selects on the CPU for the tests.
#pragma once

#include <tuple>

#include "../common/glue.h"

namespace blob {
namespace cc {

constexpr int kColI = 0, kColP = 1, kColT = 2, kColN = 3, kColE = 4;
BLOB_HD int num_stats(const LossParams& prm) { return prm.with_ce ? 5 : 4; }
BLOB_HD int num_coef(const LossParams& prm) { return prm.with_ce ? 3 : 2; }

// The kernels of a fused device. Tensors contiguous, (B, C, V); `labels` are the table indices
// (the region ids, or their compacted positions), `targets` the instance ids (same dtype).
struct Kernels {
  // Writes every entry of stats (B, C, K, num_stats). Returns false where a region index lies
  // outside [0, bound), or (check_ids) an instance voxel's region differs from its instance id.
  bool (*accumulate)(const at::Tensor& input, const at::Tensor& labels, const at::Tensor& targets,
                     const LossParams& prm, int64_t K, int64_t bound, bool check_ids,
                     at::Tensor& stats);
  // grad_input = grad_out * dL/dx from the coefficient table; false on an index outside it.
  bool (*backward)(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& labels,
                   const at::Tensor& targets, const at::Tensor& coef, const LossParams& prm,
                   at::Tensor& grad_input);
};

// Parameters of a CC op. masking is set so that the blob kernels' BCE helpers compute one form
// only, the global term's (with logits for sigmoid, on probabilities for "none"), which is also
// the form of the regions' BCE (MONAI DiceCELoss(sigmoid=True) on the region's voxels).
LossParams make_cc_params(double alpha, double beta, const std::string& activation,
                          bool squared_pred, double smooth_nr, double smooth_dr, bool with_ce,
                          double lambda_dice, double lambda_ce, const char* op);

// The checks of `regions` against `instances` (shape, dtype, device).
void check_regions(const at::Tensor& regions, const at::Tensor& instances, const char* op);

// Forward and backward on a fused device's kernels, or (k == nullptr) the ATen composite.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const Kernels* k, const at::Tensor& input,
                                                       const at::Tensor& instances,
                                                       const at::Tensor& regions,
                                                       const LossParams& prm, int64_t max_label,
                                                       const char* op);
at::Tensor backward(const Kernels* k, const at::Tensor& grad, const at::Tensor& input,
                    const at::Tensor& instances, const at::Tensor& regions, const at::Tensor& coef,
                    const at::Tensor& label_ids, const LossParams& prm, const char* op);

// The composite (ops/cc_composite.cpp); arguments already checked, label range resolved. Bad
// ids or regions make loss and coef NaN (no sync); bad_ids (0-dim bool: a region id outside
// [0, bound) or an instance voxel whose region is not its id) and bad_region ((B, C, K) bool: a
// region without instance voxels in a plane with instances) say which, for the CPU's errors.
struct CompositeOut {
  at::Tensor loss, coef, bad_ids, bad_region;
};
CompositeOut forward_composite(const at::Tensor& input,
                                                     const at::Tensor& instances,
                                                     const at::Tensor& regions,
                                                     const detail::LabelRange& range,
                                                     const LossParams& prm, const char* op);
at::Tensor backward_composite(const at::Tensor& grad, const at::Tensor& input,
                              const at::Tensor& instances, const at::Tensor& labels,
                              const at::Tensor& coef, const LossParams& prm);

// The operator entry points (schemas in ops/cc_ops.cpp); k == nullptr: the composite.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dice_forward(
    const Kernels* k, const at::Tensor& input, const at::Tensor& instances,
    const at::Tensor& regions, double alpha, double beta, c10::string_view activation,
    bool squared_pred, double smooth_nr, double smooth_dr, int64_t max_label);
std::tuple<at::Tensor, at::Tensor, at::Tensor> dice_ce_forward(
    const Kernels* k, const at::Tensor& input, const at::Tensor& instances,
    const at::Tensor& regions, double alpha, double beta, double lambda_dice, double lambda_ce,
    c10::string_view activation, bool squared_pred, double smooth_nr, double smooth_dr,
    int64_t max_label);
at::Tensor dice_backward(const Kernels* k, const at::Tensor& grad, const at::Tensor& input,
                         const at::Tensor& instances, const at::Tensor& regions,
                         const at::Tensor& coef, const at::Tensor& label_ids,
                         c10::string_view activation, bool squared_pred);
at::Tensor dice_ce_backward(const Kernels* k, const at::Tensor& grad, const at::Tensor& input,
                            const at::Tensor& instances, const at::Tensor& regions,
                            const at::Tensor& coef, const at::Tensor& label_ids,
                            c10::string_view activation, bool squared_pred);

// One device's entry points, for its TORCH_LIBRARY_IMPL block (K: its kernels, or nullptr).
template <const Kernels* K>
struct DeviceOps {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> dice_forward(
      const at::Tensor& input, const at::Tensor& instances, const at::Tensor& regions,
      double alpha, double beta, c10::string_view activation, bool squared_pred,
      double smooth_nr, double smooth_dr, int64_t max_label) {
    return cc::dice_forward(K, input, instances, regions, alpha, beta, activation, squared_pred,
                            smooth_nr, smooth_dr, max_label);
  }
  static at::Tensor dice(const at::Tensor& input, const at::Tensor& instances,
                         const at::Tensor& regions, double alpha, double beta,
                         c10::string_view activation, bool squared_pred, double smooth_nr,
                         double smooth_dr, int64_t max_label) {
    return std::get<0>(dice_forward(input, instances, regions, alpha, beta, activation,
                                    squared_pred, smooth_nr, smooth_dr, max_label));
  }
  static at::Tensor dice_backward(const at::Tensor& grad, const at::Tensor& input,
                                  const at::Tensor& instances, const at::Tensor& regions,
                                  const at::Tensor& coef, const at::Tensor& label_ids,
                                  c10::string_view activation, bool squared_pred) {
    return cc::dice_backward(K, grad, input, instances, regions, coef, label_ids, activation,
                             squared_pred);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> dice_ce_forward(
      const at::Tensor& input, const at::Tensor& instances, const at::Tensor& regions,
      double alpha, double beta, double lambda_dice, double lambda_ce,
      c10::string_view activation, bool squared_pred, double smooth_nr, double smooth_dr,
      int64_t max_label) {
    return cc::dice_ce_forward(K, input, instances, regions, alpha, beta, lambda_dice, lambda_ce,
                               activation, squared_pred, smooth_nr, smooth_dr, max_label);
  }
  static at::Tensor dice_ce(const at::Tensor& input, const at::Tensor& instances,
                            const at::Tensor& regions, double alpha, double beta,
                            double lambda_dice, double lambda_ce, c10::string_view activation,
                            bool squared_pred, double smooth_nr, double smooth_dr,
                            int64_t max_label) {
    return std::get<0>(dice_ce_forward(input, instances, regions, alpha, beta, lambda_dice,
                                       lambda_ce, activation, squared_pred, smooth_nr, smooth_dr,
                                       max_label));
  }
  static at::Tensor dice_ce_backward(const at::Tensor& grad, const at::Tensor& input,
                                     const at::Tensor& instances, const at::Tensor& regions,
                                     const at::Tensor& coef, const at::Tensor& label_ids,
                                     c10::string_view activation, bool squared_pred) {
    return cc::dice_ce_backward(K, grad, input, instances, regions, coef, label_ids, activation,
                                squared_pred);
  }
};

}  // namespace cc
}  // namespace blob
