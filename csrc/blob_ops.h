// Device-independent glue of the blob loss operators: argument checking, the label range, and
// the drivers that run the three kernels each device provides (accumulate, finalize, backward).
//
// Each device file (cpu/blob_loss_kernel.cpp, cuda/blob_loss_kernel.cu) fills a DeviceKernels
// with its kernels and registers, in its own TORCH_LIBRARY_IMPL block, thin functions that call
// the drivers below. Autograd lives in autograd/blob_autograd.cpp; schemas in ops/blob_ops.cpp.
#pragma once

#include <torch/torch.h>

#include <string>
#include <tuple>

#include "blob_loss_math.h"

namespace blob {

// What DeviceKernels::forward did: nothing (the driver runs accumulate and finalize), the
// accumulate pass only (stats and the invalid flag written; the driver runs finalize), or all of
// the forward (loss and coef written too).
enum ForwardStatus : int32_t { kForwardNotHandled = 0, kForwardAccumulated = 1, kForwardDone = 2 };

// The kernels one device provides. Tensors are contiguous and on that device; `op` names the
// public operator for error messages.
struct DeviceKernels {
  // input (B, C, V) floating, labels (B, C, V) integer -> stats (B, C, K, 3) float64 (allocated
  // uninitialised: the kernel writes every entry). Ids outside [0, bound) (bound <= K) are never
  // read out of bounds: a device that can tell without a sync returns false (the CPU); the CUDA
  // kernel sets `invalid` (an int32 scalar on the device, zero on entry), which turns the loss
  // and the gradient into NaN so that sync-free calls cannot hide them.
  bool (*accumulate)(const at::Tensor& input, const at::Tensor& labels, const LossParams& prm,
                     int64_t K, int64_t bound, at::Tensor& stats, const at::Tensor& invalid,
                     const char* op);
  // stats -> loss (0-dim, float32 or float64: the output's dtype) and coef (B, C, K, 2) float64.
  void (*finalize)(const at::Tensor& stats, const at::Tensor& invalid, const LossParams& prm,
                   at::Tensor& loss, at::Tensor& coef, const char* op);
  // One pass: grad_input = grad_out * (a[l] + b[l] dpow(p)) * act'(x). Returns false where an id
  // outside the coefficient table was met (CPU; CUDA writes NaN instead).
  bool (*backward)(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& labels,
                   const at::Tensor& coef, const LossParams& prm, at::Tensor& grad_input,
                   const char* op);
  // Whether accumulate needs the `invalid` flag (devices that cannot raise without a sync).
  bool uses_invalid_flag;
  // Whether accumulate, finalize and backward also compute blob Dice+CE (prm.with_ce: 5 stats
  // and 4 coefficients per label), asked at each call (CUDA: the opt-in path fused_dice_ce).
  // Where not, the device's Dice kernels run and the BCE is added with ATen ops
  // (dice_ce_forward_composite in ops/blob_drivers.cpp).
  bool (*fused_ce)();
  // Optional (CUDA opt-in paths coop_forward / split_forward): accumulate and finalize of a loss
  // in fewer launches. Arguments as for accumulate and finalize, except `invalid`, which it
  // allocates and writes when it handles the call (it is undefined on entry).
  ForwardStatus (*forward)(const at::Tensor& input, const at::Tensor& labels,
                           const LossParams& prm, int64_t K, int64_t bound, at::Tensor& stats,
                           at::Tensor& invalid, at::Tensor& loss, at::Tensor& coef,
                           const char* op) = nullptr;
};

// ---- opt-in CUDA paths (docs/design.md section 5.6, "Device code without a GPU") ------------
// CUDA code that has not yet run on a GPU lands behind an opt-in switch: it runs only when its
// name is listed in the environment variable BLOBBENCH_CUDA_PATHS (comma separated; "all" turns
// on every one but split_forward, which only forces coop_forward's fallback), read at each call.
// The default path stays the one last verified on a GPU. An unknown name raises a ValueError
// naming the variable and the known names, so a typo cannot silently run the default.
// kCudaPathNames is the list (docs/design.md lists what each does).
extern const char* const kCudaPathNames[];
extern const int kNumCudaPaths;
bool cuda_path_enabled(const std::string& name);
// BLOBBENCH_CUDA_BLOCKS_PER_PLANE (test and tuning aid of the opt-in forward paths): blocks per
// plane of their accumulate pass, or 0 when unset (chosen by occupancy). Kept within
// [min_blocks_per_plane(V), block_steps(V)] (csrc/cuda_forward_plan.h).
int64_t cuda_forced_blocks_per_plane();
// BLOBBENCH_CUDA_COOP (tests only; read in csrc/cuda/forward_fast.cu): 'off' or 'refused' sends
// the opt-in forward to its fallbacks on a device that launches cooperatively.

// Deterministic CUDA accumulate with a label range too large for shared memory: one zeroed row
// of `row_bytes` per warp (`warps` per block) in global memory. plan_warp_rows keeps all rows
// within `budget` bytes: it cuts `blocks` (blocks per plane wanted, >= 1) so that every plane
// fits one launch, and when even one block per plane does not, it runs one block per plane with
// the planes in chunks of planes_per_launch, one launch each (at least one plane: a plane whose
// rows alone exceed the budget runs alone, the one case left above it). Each plane's additions
// and their order depend only on `blocks`, so chunking changes no bit. Plain C++, tested on the
// CPU through blob::_warp_row_plan. warp_rows_budget(): 256 MiB, or the test-only environment
// variable BLOBBENCH_WARP_ROWS_BUDGET (bytes) that lets a small CUDA test reach the chunking.
struct WarpRowPlan {
  int64_t blocks;             // blocks per plane
  int64_t planes_per_launch;  // planes of one launch (the last launch may have fewer)
};
WarpRowPlan plan_warp_rows(int64_t planes, int64_t row_bytes, int64_t warps, int64_t blocks,
                           int64_t budget);
int64_t warp_rows_budget();

// Serial finalisation on host memory (CPU kernel, and the reference for the CUDA one).
void finalize_host(const double* stats, int64_t B, int64_t C, int64_t K, const LossParams& prm,
                   double* loss, double* coef);

// ---- what the device registrations call, with their kernels ---------------------------------
// The forward ops return (loss, coef, label_ids): loss is 0-dim (float32 for float16/bfloat16
// input, else input's dtype), coef the (B, C, K, 2) float64 table of per-label gradient
// coefficients, label_ids (B, C, K) the sorted ids of each plane when the label range was
// compacted, else (B, C, 0).

std::tuple<at::Tensor, at::Tensor, at::Tensor> dice_forward(
    const DeviceKernels& k, const at::Tensor& input, const at::Tensor& instances, double alpha,
    double beta, c10::string_view activation, c10::string_view masking, bool squared_pred,
    double smooth_nr, double smooth_dr, int64_t max_label);
std::tuple<at::Tensor, at::Tensor, at::Tensor> tversky_forward(
    const DeviceKernels& k, const at::Tensor& input, const at::Tensor& instances, double alpha,
    double beta, c10::string_view activation, c10::string_view masking, double fp_weight,
    double fn_weight, double smooth_nr, double smooth_dr, int64_t max_label);
at::Tensor dice_backward(const DeviceKernels& k, const at::Tensor& grad, const at::Tensor& input,
                         const at::Tensor& instances, const at::Tensor& coef,
                         const at::Tensor& label_ids, c10::string_view activation,
                         bool squared_pred);
at::Tensor tversky_backward(const DeviceKernels& k, const at::Tensor& grad, const at::Tensor& input,
                            const at::Tensor& instances, const at::Tensor& coef,
                            const at::Tensor& label_ids, c10::string_view activation);
// Blob Dice+CE: the forward returns coef (B, C, K, 4) (a, b of the Dice part; c, d of the BCE).
std::tuple<at::Tensor, at::Tensor, at::Tensor> dice_ce_forward(
    const DeviceKernels& k, const at::Tensor& input, const at::Tensor& instances, double alpha,
    double beta, double lambda_dice, double lambda_ce, c10::string_view activation,
    c10::string_view masking, bool squared_pred, double smooth_nr, double smooth_dr,
    int64_t max_label);
at::Tensor dice_ce_backward(const DeviceKernels& k, const at::Tensor& grad, const at::Tensor& input,
                            const at::Tensor& instances, const at::Tensor& coef,
                            const at::Tensor& label_ids, c10::string_view activation,
                            bool squared_pred);
// Per-label sums (B, C, K, 3) = (sum p, sum p^q, count) and the compacted ids (B, C, K), or
// (B, C, 0) when dense; NaN where the CUDA kernel met an id above max_label.
std::tuple<at::Tensor, at::Tensor> label_stats(const DeviceKernels& k, const at::Tensor& input,
                                               const at::Tensor& instances,
                                               c10::string_view activation, bool squared_pred,
                                               int64_t max_label);

// The operator entry points of one device: the drivers above bound to that device's kernels.
// Each device file registers these explicitly in its TORCH_LIBRARY_IMPL block, e.g.
// m.impl("dice", &DeviceOps<kCpuKernels>::dice).
template <const DeviceKernels& K>
struct DeviceOps {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> dice_forward(
      const at::Tensor& input, const at::Tensor& instances, double alpha, double beta,
      c10::string_view activation, c10::string_view masking, bool squared_pred, double smooth_nr,
      double smooth_dr, int64_t max_label) {
    return blob::dice_forward(K, input, instances, alpha, beta, activation, masking, squared_pred,
                              smooth_nr, smooth_dr, max_label);
  }
  static at::Tensor dice(const at::Tensor& input, const at::Tensor& instances, double alpha,
                         double beta, c10::string_view activation, c10::string_view masking,
                         bool squared_pred, double smooth_nr, double smooth_dr, int64_t max_label) {
    return std::get<0>(dice_forward(input, instances, alpha, beta, activation, masking,
                                    squared_pred, smooth_nr, smooth_dr, max_label));
  }
  static at::Tensor dice_backward(const at::Tensor& grad, const at::Tensor& input,
                                  const at::Tensor& instances, const at::Tensor& coef,
                                  const at::Tensor& label_ids, c10::string_view activation,
                                  bool squared_pred) {
    return blob::dice_backward(K, grad, input, instances, coef, label_ids, activation,
                               squared_pred);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> tversky_forward(
      const at::Tensor& input, const at::Tensor& instances, double alpha, double beta,
      c10::string_view activation, c10::string_view masking, double fp_weight, double fn_weight,
      double smooth_nr, double smooth_dr, int64_t max_label) {
    return blob::tversky_forward(K, input, instances, alpha, beta, activation, masking, fp_weight,
                                 fn_weight, smooth_nr, smooth_dr, max_label);
  }
  static at::Tensor tversky(const at::Tensor& input, const at::Tensor& instances, double alpha,
                            double beta, c10::string_view activation, c10::string_view masking,
                            double fp_weight, double fn_weight, double smooth_nr, double smooth_dr,
                            int64_t max_label) {
    return std::get<0>(tversky_forward(input, instances, alpha, beta, activation, masking,
                                       fp_weight, fn_weight, smooth_nr, smooth_dr, max_label));
  }
  static at::Tensor tversky_backward(const at::Tensor& grad, const at::Tensor& input,
                                     const at::Tensor& instances, const at::Tensor& coef,
                                     const at::Tensor& label_ids, c10::string_view activation) {
    return blob::tversky_backward(K, grad, input, instances, coef, label_ids, activation);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> dice_ce_forward(
      const at::Tensor& input, const at::Tensor& instances, double alpha, double beta,
      double lambda_dice, double lambda_ce, c10::string_view activation, c10::string_view masking,
      bool squared_pred, double smooth_nr, double smooth_dr, int64_t max_label) {
    return blob::dice_ce_forward(K, input, instances, alpha, beta, lambda_dice, lambda_ce,
                                 activation, masking, squared_pred, smooth_nr, smooth_dr,
                                 max_label);
  }
  static at::Tensor dice_ce(const at::Tensor& input, const at::Tensor& instances, double alpha,
                            double beta, double lambda_dice, double lambda_ce,
                            c10::string_view activation, c10::string_view masking,
                            bool squared_pred, double smooth_nr, double smooth_dr,
                            int64_t max_label) {
    return std::get<0>(dice_ce_forward(input, instances, alpha, beta, lambda_dice, lambda_ce,
                                       activation, masking, squared_pred, smooth_nr, smooth_dr,
                                       max_label));
  }
  static at::Tensor dice_ce_backward(const at::Tensor& grad, const at::Tensor& input,
                                     const at::Tensor& instances, const at::Tensor& coef,
                                     const at::Tensor& label_ids, c10::string_view activation,
                                     bool squared_pred) {
    return blob::dice_ce_backward(K, grad, input, instances, coef, label_ids, activation,
                                  squared_pred);
  }
  static std::tuple<at::Tensor, at::Tensor> label_stats(const at::Tensor& input,
                                                        const at::Tensor& instances,
                                                        c10::string_view activation,
                                                        bool squared_pred, int64_t max_label) {
    return blob::label_stats(K, input, instances, activation, squared_pred, max_label);
  }
};

// Error-message formatting without std::ostream number formatting: on one GPU machine's image
// (torch 2.11, Python 3.12) a TORCH_CHECK that streamed an integer crashed the process, while
// string-only messages worked. std::to_string avoids the locale facets involved.
std::string num(int64_t v);
std::string shape(at::IntArrayRef sizes);

// The largest label range always kept as a dense table.
int64_t dense_label_limit(int64_t voxels_per_plane);
// Bytes a caller-bounded dense table (stats and coefficients) may take before the op compacts
// the ids instead (docs/design.md, "Label ranges").
constexpr int64_t kDenseTableBudget = int64_t(256) << 20;

}  // namespace blob
