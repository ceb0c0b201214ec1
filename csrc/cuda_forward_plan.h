// Launch planning of the opt-in CUDA forward paths (csrc/cuda/forward_fast.cu): plain C++, so
// that the CPU build exposes it to the tests (blob::_cuda_forward_plan) without a GPU.
//
// A block of the accumulate pass covers at most kMaxBlockVoxels voxels of its plane, so that its
// uint32 counts are exact (docs/design.md section 5.3); every block of a plane covers the plane's
// block steps blk, blk + bpp, ... of kBlockStep voxels each (8 warps x 256 voxels).
#pragma once

#include <algorithm>
#include <cstdint>

namespace blob {

constexpr int64_t kMaxBlockVoxels = int64_t(1) << 30;
constexpr int64_t kBlockStep = 8 * 256;

enum ForwardMode : int32_t { kForwardDefault = 0, kForwardCoop = 1, kForwardSplit = 2 };

struct ForwardPlan {
  int32_t mode;         // ForwardMode
  int64_t blocks;       // blocks per plane of the accumulate pass
};

inline int64_t plan_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Block steps of a plane of V voxels: the most blocks per plane that all have work.
inline int64_t block_steps(int64_t V) { return std::max<int64_t>(1, plan_ceil_div(V, kBlockStep)); }

// The fewest blocks per plane that keep every block under kMaxBlockVoxels voxels.
inline int64_t min_blocks_per_plane(int64_t V) {
  return std::max<int64_t>(1, plan_ceil_div(block_steps(V), kMaxBlockVoxels / kBlockStep));
}

// Blocks per plane of a plain accumulate launch: enough blocks to fill `resident` (blocks the
// device holds at once), at most one per block step, at least min_blocks_per_plane. `forced` > 0
// (BLOBBENCH_CUDA_BLOCKS_PER_PLANE) replaces the first rule, within the other two.
inline int64_t accumulate_blocks(int64_t V, int64_t planes, int64_t resident, int64_t forced) {
  const int64_t steps = block_steps(V);
  int64_t bpp = forced > 0 ? forced
                           : std::max<int64_t>(1, plan_ceil_div(std::max<int64_t>(resident, 1),
                                                                std::max<int64_t>(planes, 1)));
  bpp = std::min(bpp, steps);
  return std::max(bpp, min_blocks_per_plane(V));
}

// Which forward the coop_forward / split_forward paths run. The one-launch cooperative forward
// needs whole blocks per plane co-resident: planes * bpp <= coop_resident (the cooperative
// kernel's occupancy times the SMs) with bpp >= min_blocks_per_plane; else, or when the device
// cannot launch cooperatively, or when split_forward is on, the two-launch variant (a plain
// accumulate launch sized by acc_resident, then the finalisation). Neither path on: default.
inline ForwardPlan plan_forward(int64_t V, int64_t planes, bool coop, bool split,
                                bool coop_supported, int64_t coop_resident, int64_t acc_resident,
                                int64_t forced) {
  ForwardPlan p{kForwardDefault, 0};
  if (!coop && !split) return p;
  if (coop && !split && coop_supported && planes > 0 && planes <= coop_resident) {
    const int64_t fit = coop_resident / planes;
    const int64_t bpp = std::min(forced > 0 ? forced : fit, block_steps(V));
    if (bpp >= min_blocks_per_plane(V) && bpp <= fit) {
      p.mode = kForwardCoop;
      p.blocks = bpp;
      return p;
    }
  }
  p.mode = kForwardSplit;
  p.blocks = accumulate_blocks(V, planes, acc_resident, forced);
  return p;
}

}  // namespace blob
