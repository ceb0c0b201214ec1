// Device-side building blocks of the CUDA accumulate kernels, shared by every .cu file of
// csrc/cuda/ (the default kernels in blob_loss_kernel.cu and the opt-in paths beside them):
// tile geometry, accumulator types, the warp tables with their cooperative run flushes.
// Header-only, internal linkage: each .cu file gets its own copy.
#pragma once

#include <cstdint>

#include "../blob_ops.h"

namespace blob {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kItems = 8;  // voxels per lane per tile
constexpr int kTile = 32 * kItems;
constexpr unsigned kFull = 0xffffffffu;

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// Where a warp's flushes go: its own K x 3 table (in shared memory, or a row of global memory
// in deterministic mode for large label ranges), or double atomics into the plane's table.
template <typename acc_t>
struct WarpTable {
  acc_t* rows;
  double* stats;
  bool atomics;
  __device__ __forceinline__ void add(int64_t key, acc_t s, acc_t q, acc_t n) const {
    if (atomics) {
      atomicAdd(stats + key * kNumStats + 0, double(s));
      atomicAdd(stats + key * kNumStats + 1, double(q));
      atomicAdd(stats + key * kNumStats + 2, double(n));
    } else {
      acc_t* e = rows + key * kNumStats;
      e[0] += s;
      e[1] += q;
      e[2] += n;
    }
  }
};

__device__ __forceinline__ float act_exp(float x) { return expf(x); }
__device__ __forceinline__ double act_exp(double x) { return exp(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t activate(acc_t x, int32_t act) {
  return act == kSigmoid ? acc_t(1) / (acc_t(1) + act_exp(-x)) : x;
}

// One step of the online softmax over the channels of a position: mx and z are the max and the
// sum of exp(. - mx) so far, v the next logit. INF = false is the default update,
// z * exp(mx - m) + exp(v - m), which is NaN when v and mx are both -inf (mx starts at -inf, so
// a -inf logit before the first finite one poisons z). INF = true (opt-in path `softmax_inf`):
// the same values for finite logits (z * exp(mx - v) + exp(0), or z * exp(0) + exp(v - mx)), and
// a -inf logit adds exactly 0. A position whose logits are all -inf keeps z = 0, and its p =
// exp(x - mx) / z is NaN, as torch.softmax gives; a +inf logit gives NaN too, as in torch.
template <bool INF, typename acc_t>
__device__ __forceinline__ void softmax_step(acc_t& mx, acc_t& z, acc_t v) {
  if (!INF) {
    const acc_t m = v > mx ? v : mx;
    z = z * act_exp(mx - m) + act_exp(v - m);
    mx = m;
  } else if (v > mx) {
    z = z * act_exp(mx - v) + acc_t(1);
    mx = v;
  } else {
    z += v == acc_t(-INFINITY) ? acc_t(0) : act_exp(v - mx);  // a NaN v stays NaN
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
}

// Warp-cooperative flush of the runs of the lanes with `pred`: the lanes flushing the same key
// are summed with a fixed butterfly and their lowest lane writes. All lanes must call it.
template <typename acc_t>
__device__ __forceinline__ void warp_flush(bool pred, int64_t key, acc_t s, acc_t q, acc_t n,
                                           const WarpTable<acc_t>& table) {
  const int lane = threadIdx.x & 31;
  unsigned pending = __ballot_sync(kFull, pred);
  while (pending) {
    const int leader = __ffs(pending) - 1;
    const int64_t group = __shfl_sync(kFull, key, leader);
    const bool in = pred && key == group;
    const acc_t gs = warp_sum<acc_t>(in ? s : acc_t(0));
    const acc_t gq = warp_sum<acc_t>(in ? q : acc_t(0));
    const acc_t gn = warp_sum<acc_t>(in ? n : acc_t(0));
    if (lane == leader) table.add(group, gs, gq, gn);
    __syncwarp();
    pending &= ~__ballot_sync(kFull, in);
  }
}

// A lane's current run of equal keys.
template <typename acc_t>
struct Run {
  int64_t key = -1;
  acc_t s = 0, q = 0, n = 0;

  // Adds one voxel (or nothing when !valid); flushes the run when the key changes.
  __device__ __forceinline__ void push(bool valid, int64_t k, acc_t p, acc_t pq,
                                       const WarpTable<acc_t>& table) {
    const bool change = valid && k != key;
    warp_flush<acc_t>(change && n > acc_t(0), key, s, q, n, table);
    if (change) {
      key = k;
      s = q = n = acc_t(0);
    }
    if (valid) {
      s += p;
      q += pq;
      n += acc_t(1);
    }
  }

  __device__ __forceinline__ void close(const WarpTable<acc_t>& table) {
    warp_flush<acc_t>(n > acc_t(0), key, s, q, n, table);
    s = q = n = acc_t(0);
  }
};

// Where a block's tables live.
struct TableArgs {
  void* partial;    // shared mode: one row per block; global rows: one row per warp
  double* stats;    // (planes, entries) float64, atomics mode
  int64_t entries;  // table entries of one plane (softmax: C * K * 3)
  bool atomics;
};

template <typename acc_t, bool SHARED>
__device__ __forceinline__ WarpTable<acc_t> open_tables(acc_t* smem, const TableArgs& ta,
                                                        int64_t plane) {
  const int warp = threadIdx.x >> 5;
  WarpTable<acc_t> t;
  t.atomics = false;
  t.stats = nullptr;
  if (SHARED) {
    for (int64_t i = threadIdx.x; i < kWarps * ta.entries; i += blockDim.x) smem[i] = acc_t(0);
    __syncthreads();
    t.rows = smem + warp * ta.entries;
  } else if (ta.atomics) {
    t.rows = nullptr;
    t.atomics = true;
    t.stats = ta.stats + plane * ta.entries;
  } else {
    const int64_t warps_per_plane = int64_t(gridDim.x) * kWarps;
    const int64_t row = plane * warps_per_plane + int64_t(blockIdx.x) * kWarps + warp;
    t.rows = static_cast<acc_t*>(ta.partial) + row * ta.entries;
  }
  return t;
}

// Shared mode: merge the warp tables, in warp order, into the block's partial row.
template <typename acc_t, bool SHARED>
__device__ __forceinline__ void close_tables(const acc_t* smem, const TableArgs& ta,
                                             int64_t plane) {
  if (!SHARED) return;
  __syncthreads();
  acc_t* row = static_cast<acc_t*>(ta.partial) + (plane * gridDim.x + blockIdx.x) * ta.entries;
  for (int64_t i = threadIdx.x; i < ta.entries; i += blockDim.x) {
    acc_t v = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += smem[w * ta.entries + i];
    row[i] = v;
  }
}

__device__ __forceinline__ bool label_ok(int64_t k, int64_t K) { return k >= 0 && k < K; }

}  // namespace
}  // namespace blob
