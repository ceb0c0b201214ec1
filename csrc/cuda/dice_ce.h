// Host entry points of the opt-in CUDA paths in dice_ce_kernel.cu (issue 19; docs/design.md
// section 5.6). blob_loss_kernel.cu's accumulate_cuda / finalize_cuda / backward_cuda call them:
//   - finalize_cuda_parallel: the finalisation parallel over labels (path `parallel_finalize`),
//     and the finalisation of the fused Dice+CE (prm.with_ce), which has no other CUDA version;
//   - accumulate_cuda_ce / backward_cuda_ce: blob Dice+CE fused in the accumulate and backward
//     kernels (prm.with_ce; reached only when the path `fused_dice_ce` is on, see
//     cuda_fuses_dice_ce in blob_loss_kernel.cu).
// Arguments as DeviceKernels' (blob_ops.h); tensors contiguous, on the current device.
#pragma once

#include "../blob_ops.h"

namespace blob {

void finalize_cuda_parallel(const at::Tensor& stats, const at::Tensor& invalid,
                            const LossParams& prm, at::Tensor& loss_out, at::Tensor& coef);
bool accumulate_cuda_ce(const at::Tensor& input, const at::Tensor& labels, const LossParams& prm,
                        int64_t K, at::Tensor& stats, const at::Tensor& invalid);
bool backward_cuda_ce(const at::Tensor& grad_out, const at::Tensor& input,
                      const at::Tensor& labels, const at::Tensor& coef, const LossParams& prm,
                      at::Tensor& grad_input);

}  // namespace blob
