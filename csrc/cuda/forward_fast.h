// The opt-in CUDA forward paths of forward_fast.cu (BLOBBENCH_CUDA_PATHS, docs/design.md 5.3),
// called from the host functions of blob_loss_kernel.cu.
#pragma once

#include "../blob_ops.h"

namespace blob {

// vector_loads: the sigmoid / none accumulate pass with 4 voxels per load, prefetch of the next
// tile and exact integer counts. Returns false, having done nothing, where it does not apply
// (path off, softmax, a table too large for shared memory, V not a multiple of 4 or a pointer not
// aligned to 4 elements): the caller then runs the default kernel. Dice+CE's composite
// (ops/blob_drivers.cpp) clears with_ce, so its Dice sums and its BCE sums run here too. `invalid` is
// zero on entry, as for DeviceKernels::accumulate.
bool accumulate_fast_cuda(const at::Tensor& input, const at::Tensor& labels, const LossParams& prm,
                          int64_t K, at::Tensor& stats, const at::Tensor& invalid);

// coop_forward / split_forward: DeviceKernels::forward of CUDA.
ForwardStatus forward_fast_cuda(const at::Tensor& input, const at::Tensor& labels,
                                const LossParams& prm, int64_t K, int64_t bound, at::Tensor& stats,
                                at::Tensor& invalid, at::Tensor& loss, at::Tensor& coef,
                                const char* op);

}  // namespace blob
