// Opt-in CUDA forward paths (BLOBBENCH_CUDA_PATHS; docs/design.md section 5.3). NOT YET RUN ON A
// GPU: compiled and reviewed only; the default kernels (blob_loss_kernel.cu) stay the verified path.
//
// vector_loads: the sigmoid / none accumulate pass. Where V % 4 == 0 and both pointers are
// aligned to 4 elements, lane L of a warp loads voxels base + 4 (32 j + L) .. + 3 (j < 2) with one
// load per tensor and j (16 B of float32 logits and 16 B of int32 ids; any dtype pair, 4
// elements each); the next tile's loads are issued before the current tile is processed. Tiles
// whose 256 voxels are all background take a shortcut with the same additions in the same order.
// Counts are integers at every level: uint32 per lane run, warp table and block (a block covers
// at most 2^30 voxels, csrc/cuda_forward_plan.h), summed over the blocks of a plane in double
// (exact below 2^53). Sums, runs and flushes are those of the default kernel: background in
// registers, warp-cooperative run flushes with a fixed butterfly, warp tables merged in warp order,
// block rows summed in block order in double; out-of-range ids set the invalid flag.
//
// coop_forward: accumulate (the vector body where vector_loads applies, else one voxel per load)
// and the finalisation (per-plane summaries, the combine of the planes, the per-label
// coefficients: the same device functions as the default finalisation, finalize_common.cuh) in
// ONE cooperative launch with grid syncs between the phases. The grid is (blocks per plane,
// planes), co-resident by the occupancy API. When the planes outnumber the resident blocks, the
// device cannot launch cooperatively, split_forward is on, or the launch answers
// cudaErrorCooperativeLaunchTooLarge (e.g. under MPS): two launches, the accumulate pass and a
// cooperative finalisation; if that one cannot launch either, the stats and the flag are written
// by a plain kernel and the default finalisation runs. Nothing here syncs with the host.
#include <ATen/Dispatch.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>

#include "../blob_ops.h"
#include "../cuda_forward_plan.h"
#include "accumulate_common.cuh"
#include "finalize_common.cuh"
#include "forward_fast.h"

namespace blob {
namespace {

namespace cg = cooperative_groups;

static_assert(kThreads == kReduceThreads, "the finalisation phases run on the accumulate blocks");
static_assert(int64_t(kWarps) * kTile == kBlockStep, "cuda_forward_plan.h's block step");

constexpr int kVec = 4;                    // voxels per vector load
constexpr int kVecLoads = kItems / kVec;   // vector loads per lane and tile, per tensor
constexpr size_t kReduceSmem = sizeof(double) * kReduceThreads * 4;  // block_reduce<4>'s buffer

template <typename T>
struct alignas(sizeof(T) * kVec) Vec4 {
  T v[kVec];
};

__device__ __forceinline__ uint32_t warp_sum_u32(uint32_t v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_add_sync(kFull, v);
#else
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
#endif
}

// A warp's table in shared memory: K x (sum p, sum p^q) and K uint32 counts.
template <typename acc_t>
struct ExactTable {
  acc_t* sums;
  uint32_t* counts;
  __device__ __forceinline__ void add(int key, acc_t s, acc_t q, uint32_t n) const {
    sums[2 * key] += s;
    sums[2 * key + 1] += q;
    counts[key] += n;
  }
};

// warp_flush of accumulate_common.cuh with an integer count. Without squared_pred q == s bit for
// bit (the same additions of the same values), so its butterfly is skipped.
template <typename acc_t>
__device__ __forceinline__ void exact_flush(bool pred, int key, acc_t s, acc_t q, uint32_t n,
                                            bool squared, const ExactTable<acc_t>& table) {
  const int lane = threadIdx.x & 31;
  unsigned pending = __ballot_sync(kFull, pred);
  while (pending) {
    const int leader = __ffs(pending) - 1;
    const int group = __shfl_sync(kFull, key, leader);
    const bool in = pred && key == group;
    const acc_t gs = warp_sum<acc_t>(in ? s : acc_t(0));
    const acc_t gq = squared ? warp_sum<acc_t>(in ? q : acc_t(0)) : gs;
    const uint32_t gn = warp_sum_u32(in ? n : 0u);
    if (lane == leader) table.add(group, gs, gq, gn);
    __syncwarp();
    pending &= ~__ballot_sync(kFull, in);
  }
}

// Run of accumulate_common.cuh with an integer count (keys < K fit an int: K is bounded by
// shared memory here).
template <typename acc_t>
struct ExactRun {
  int key = -1;
  acc_t s = 0, q = 0;
  uint32_t n = 0;

  __device__ __forceinline__ void push(bool valid, int k, acc_t p, acc_t pq, bool squared,
                                       const ExactTable<acc_t>& table) {
    const bool change = valid && k != key;
    exact_flush<acc_t>(change && n > 0u, key, s, q, n, squared, table);
    if (change) {
      key = k;
      s = q = acc_t(0);
      n = 0u;
    }
    if (valid) {
      s += p;
      q += pq;
      ++n;
    }
  }

  __device__ __forceinline__ void close(bool squared, const ExactTable<acc_t>& table) {
    exact_flush<acc_t>(n > 0u, key, s, q, n, squared, table);
    s = q = acc_t(0);
    n = 0u;
  }
};

// One lane's kItems voxels of a warp tile of kTile voxels starting at `base`. VEC: item j is
// voxel base + 4 (32 (j / 4) + lane) + j % 4 (V % 4 == 0, so a vector is all in or all out);
// else voxel base + 32 j + lane, as in the default kernel.
template <typename scalar_t, typename label_t, bool VEC>
struct Tile {
  scalar_t x[kItems];
  label_t l[kItems];

  static __device__ __forceinline__ int64_t index(int64_t base, int j, int lane) {
    return VEC ? base + int64_t((j / kVec) * 32 + lane) * kVec + (j % kVec)
               : base + int64_t(j) * 32 + lane;
  }

  __device__ __forceinline__ void load(const scalar_t* __restrict__ xp,
                                       const label_t* __restrict__ lp, int64_t base, int64_t V,
                                       int lane) {
    if (VEC) {
#pragma unroll
      for (int j = 0; j < kVecLoads; ++j) {
        const int64_t i = base + int64_t(j * 32 + lane) * kVec;
        if (i < V) {
          const Vec4<scalar_t> xv = *reinterpret_cast<const Vec4<scalar_t>*>(xp + i);
          const Vec4<label_t> lv = *reinterpret_cast<const Vec4<label_t>*>(lp + i);
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            x[j * kVec + e] = xv.v[e];
            l[j * kVec + e] = lv.v[e];
          }
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int64_t i = base + int64_t(j) * 32 + lane;
        if (i < V) {
          x[j] = xp[i];
          l[j] = lp[i];
        }
      }
    }
  }
};

// What the accumulate blocks and the finalisation share. Block row r = plane * blocks + block.
struct FastArgs {
  int64_t V, K, planes, blocks;  // blocks: per plane
  int32_t act;
  bool squared;
  void* partial_sums;        // acc_t (planes * blocks, K, 2)
  uint32_t* partial_counts;  // (planes * blocks, K)
  int* block_flags;          // (planes * blocks): an id outside [0, K) met by the block
};

struct FinalArgs {
  int64_t B, C;
  LossParams prm;
  double* stats;      // (planes, K, 3)
  PlaneResult* pr;    // (planes)
  double* w_blob;     // (planes)
  double* w_global;   // (1)
  int* plane_flags;   // (planes)
  int* invalid;       // the op's flag, written here
  double* loss_d;     // the loss, float64 output, or
  float* loss_f;      // float32 output
  double* coef;       // (planes, K, 2)
};

// The accumulate pass of block `blk` of `plane` into its row of partial sums and counts.
template <typename scalar_t, typename label_t, bool VEC>
__device__ __forceinline__ void accumulate_block(const scalar_t* __restrict__ x,
                                                 const label_t* __restrict__ labels,
                                                 const FastArgs& a, int64_t plane, int64_t blk,
                                                 unsigned char* smem_raw) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t V = a.V, K = a.K;
  const bool squared = a.squared;
  acc_t* sums = reinterpret_cast<acc_t*>(smem_raw);
  uint32_t* counts = reinterpret_cast<uint32_t*>(sums + kWarps * K * 2);
  for (int64_t i = threadIdx.x; i < kWarps * K * 2; i += blockDim.x) sums[i] = acc_t(0);
  for (int64_t i = threadIdx.x; i < kWarps * K; i += blockDim.x) counts[i] = 0u;
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const ExactTable<acc_t> table{sums + warp * K * 2, counts + warp * K};
  const scalar_t* xp = x + plane * V;
  const label_t* lp = labels + plane * V;
  const int64_t stride = a.blocks * kWarps * kTile;

  ExactRun<acc_t> run;
  acc_t bg_s = 0, bg_q = 0;
  uint32_t bg_n = 0;
  bool bad = false;
  using TileT = Tile<scalar_t, label_t, VEC>;
  int64_t base = (blk * kWarps + warp) * kTile;
  TileT cur;
  if (base < V) cur.load(xp, lp, base, V, lane);
  for (; base < V; base += stride) {
    TileT next;  // prefetch: the next tile's loads are in flight while this one is summed
    if (base + stride < V) next.load(xp, lp, base + stride, V, lane);
    bool lane_bg = true;
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      lane_bg = lane_bg && TileT::index(base, j, lane) < V && cur.l[j] == label_t(0);
    }
    if (__all_sync(kFull, lane_bg)) {
      // All background: what the general branch below adds, in its order, without the runs.
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const acc_t p = activate<acc_t>(acc_t(cur.x[j]), a.act);
        bg_s += p;
        bg_q += squared ? p * p : p;
      }
      bg_n += uint32_t(kItems);
    } else {
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        bool valid = TileT::index(base, j, lane) < V;
        const int64_t k = valid ? int64_t(cur.l[j]) : 0;
        if (valid && !label_ok(k, K)) {
          bad = true;
          valid = false;
        }
        const acc_t p = valid ? activate<acc_t>(acc_t(cur.x[j]), a.act) : acc_t(0);
        const acc_t pq = squared ? p * p : p;
        const bool background = valid && k == 0;
        if (background) {
          bg_s += p;
          bg_q += pq;
          ++bg_n;
        }
        run.push(valid && !background, int(k), p, pq, squared, table);
      }
    }
    if (base + stride < V) cur = next;  // `next` holds no loads on the last tile
  }
  run.close(squared, table);
  bg_s = warp_sum<acc_t>(bg_s);
  bg_q = squared ? warp_sum<acc_t>(bg_q) : bg_s;
  bg_n = warp_sum_u32(bg_n);
  if (lane == 0 && bg_n > 0u) table.add(0, bg_s, bg_q, bg_n);
  // Merge the warp tables in warp order into the block's row.
  const int any_bad = __syncthreads_or(bad ? 1 : 0);
  const int64_t row = plane * a.blocks + blk;
  acc_t* ps = static_cast<acc_t*>(a.partial_sums) + row * K * 2;
  uint32_t* pc = a.partial_counts + row * K;
  for (int64_t i = threadIdx.x; i < K * 2; i += blockDim.x) {
    acc_t v = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += sums[w * K * 2 + i];
    ps[i] = v;
  }
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    uint32_t c = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) c += counts[w * K + k];
    pc[k] = c;
  }
  if (threadIdx.x == 0) a.block_flags[row] = any_bad;
}

// stats[plane][k] = the sums of the plane's block rows, in block order, in double.
template <typename acc_t>
__device__ __forceinline__ void reduce_entry(const FastArgs& a, int64_t plane, int64_t k,
                                             double* __restrict__ stats) {
  const int64_t K = a.K;
  const acc_t* ps = static_cast<const acc_t*>(a.partial_sums) + plane * a.blocks * K * 2 + 2 * k;
  const uint32_t* pc = a.partial_counts + plane * a.blocks * K + k;
  double s = 0.0, q = 0.0, n = 0.0;
  for (int64_t r = 0; r < a.blocks; ++r) {
    s += double(ps[r * K * 2]);
    q += double(ps[r * K * 2 + 1]);
    n += double(pc[r * K]);
  }
  double* st = stats + (plane * K + k) * kNumStats;
  st[0] = s;
  st[1] = q;
  st[2] = n;
}

__device__ __forceinline__ int plane_flag(const FastArgs& a, int64_t plane) {
  int f = 0;
  for (int64_t r = 0; r < a.blocks; ++r) f |= a.block_flags[plane * a.blocks + r];
  return f;
}

// The finalisation on a cooperative grid: (1) per plane, one block sums its rows into stats and
// writes its summary; (2) one thread combines the planes and writes the loss and the flag; (3)
// every thread writes coefficients. The default finalisation's device functions.
template <typename acc_t>
__device__ __forceinline__ void finalize_phases(const FastArgs& a, const FinalArgs& f,
                                                unsigned char* smem_raw) {
  cg::grid_group grid = cg::this_grid();
  double(*buf)[4] = reinterpret_cast<double(*)[4]>(smem_raw);
  const int64_t nblocks = int64_t(gridDim.x) * gridDim.y;
  const int64_t lin = int64_t(blockIdx.y) * gridDim.x + blockIdx.x;
  const int64_t P = a.planes, K = a.K;
  for (int64_t plane = lin; plane < P; plane += nblocks) {
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) reduce_entry<acc_t>(a, plane, k, f.stats);
    if (threadIdx.x == 0) f.plane_flags[plane] = plane_flag(a, plane);
    __syncthreads();
    plane_summary(f.stats, plane, f.C, K, f.prm, buf, f.pr);
  }
  grid.sync();
  if (lin == 0 && threadIdx.x == 0) {
    int bad = 0;
    for (int64_t p = 0; p < P; ++p) bad |= f.plane_flags[p];
    const double l = combine_planes(f.pr, f.B, f.C, f.prm, f.w_blob, f.w_global);
    const double out = bad ? NAN : l;
    if (f.loss_d != nullptr) {
      *f.loss_d = out;
    } else {
      *f.loss_f = float(out);
    }
    *f.invalid = bad;
  }
  grid.sync();
  const int64_t stride = nblocks * blockDim.x;
  for (int64_t i = lin * blockDim.x + threadIdx.x; i < P * K; i += stride) {
    label_coef_entry(i, f.stats, f.pr, f.w_blob, f.w_global, f.invalid, K, f.prm, f.coef);
  }
}

// vector_loads and the first launch of split_forward. Grid (blocks per plane, planes).
template <typename scalar_t, typename label_t, bool VEC>
__global__ void __launch_bounds__(kThreads)
    accumulate_fast_kernel(const scalar_t* __restrict__ x, const label_t* __restrict__ labels,
                           FastArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  accumulate_block<scalar_t, label_t, VEC>(x, labels, a, blockIdx.y, blockIdx.x, smem_raw);
}

// The plain end of vector_loads (and of split_forward without a cooperative finalisation): stats
// and the flag (zero on entry) from the block rows. One thread per (plane, label).
template <typename acc_t>
__global__ void reduce_fast_kernel(FastArgs a, double* __restrict__ stats, int* __restrict__ invalid) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= a.planes * a.K) return;
  const int64_t plane = i / a.K, k = i % a.K;
  reduce_entry<acc_t>(a, plane, k, stats);
  if (k == 0 && plane_flag(a, plane)) atomicExch(invalid, 1);
}

// coop_forward: the whole forward. Cooperative launch, grid (blocks per plane, planes).
template <typename scalar_t, typename label_t, bool VEC>
__global__ void __launch_bounds__(kThreads)
    forward_coop_kernel(const scalar_t* __restrict__ x, const label_t* __restrict__ labels,
                        FastArgs a, FinalArgs f) {
  using acc_t = typename AccType<scalar_t>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  accumulate_block<scalar_t, label_t, VEC>(x, labels, a, blockIdx.y, blockIdx.x, smem_raw);
  cg::this_grid().sync();
  finalize_phases<acc_t>(a, f, smem_raw);
}

// split_forward's second launch. Cooperative, 1-D grid.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) finalize_coop_kernel(FastArgs a, FinalArgs f) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  finalize_phases<acc_t>(a, f, smem_raw);
}

// ---- host side ----------------------------------------------------------------------------

#define BLOB_FAST_DISPATCH_TYPES(INPUT, LABELS, ...)                                       \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, INPUT, "blob_cuda_fast", [&] { \
    using in_t = scalar_t;                                                                 \
    AT_DISPATCH_V2(LABELS, "blob_cuda_fast_labels", AT_WRAP([&] {                          \
                     using lab_t = scalar_t;                                               \
                     __VA_ARGS__();                                                        \
                   }),                                                                     \
                   at::kByte, at::kShort, at::kInt, at::kLong);                            \
  })

// Bytes of the 8 warp tables of K labels (acc_t sums, uint32 counts).
size_t table_bytes(int64_t K, size_t acc_size) {
  return size_t(kWarps) * size_t(K) * (2 * acc_size + sizeof(uint32_t));
}

// Driver queries made once per device (and kernel, and shared memory size), not per call.
std::mutex& query_mutex() {
  static std::mutex m;
  return m;
}

// Raises the dynamic shared memory limit of `kernel` on the current device to `smem` where it is
// above the default 48 KiB; the largest limit set so far stays (it serves every smaller launch).
void ensure_smem_limit(const void* kernel, size_t smem) {
  if (smem <= 48 * 1024) return;
  const int device = c10::cuda::current_device();
  std::lock_guard<std::mutex> lock(query_mutex());
  static std::map<std::pair<int, const void*>, size_t> limits;
  size_t& limit = limits[{device, kernel}];
  if (limit >= smem) return;
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  limit = smem;
}

// Resident blocks per SM of `kernel` with `smem` bytes of dynamic shared memory (0 if none fit).
int64_t resident_per_sm(const void* kernel, size_t smem) {
  ensure_smem_limit(kernel, smem);
  const int device = c10::cuda::current_device();
  std::lock_guard<std::mutex> lock(query_mutex());
  static std::map<std::tuple<int, const void*, size_t>, int> resident;
  const auto key = std::make_tuple(device, kernel, smem);
  const auto it = resident.find(key);
  if (it != resident.end()) return it->second;
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, smem));
  resident[key] = n;
  return n;
}

// Whether the current device launches cooperatively. BLOBBENCH_CUDA_COOP (tests only, like
// BLOBBENCH_CUDA_BLOCKS_PER_PLANE): "off" answers no, so that the plain reduce and the default
// finalisation run; "refused" keeps the answer but treats every cooperative launch as refused
// (launch_cooperative), so that the retry with two launches runs too.
std::string coop_test_switch() {
  const char* env = std::getenv("BLOBBENCH_CUDA_COOP");
  const std::string value = env == nullptr ? "" : env;
  TORCH_CHECK_VALUE(value.empty() || value == "off" || value == "refused",
                    "BLOBBENCH_CUDA_COOP: expected 'off' or 'refused' (tests only), got '", value,
                    "'");
  return value;
}

bool coop_supported_here() {
  if (coop_test_switch() == "off") return false;
  const int device = c10::cuda::current_device();
  std::lock_guard<std::mutex> lock(query_mutex());
  static std::map<int, bool> supported;
  const auto it = supported.find(device);
  if (it != supported.end()) return it->second;
  int attr = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&attr, cudaDevAttrCooperativeLaunch, device));
  supported[device] = attr != 0;
  return attr != 0;
}

bool aligned_for_vec(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % (size_t(kVec) * t.element_size()) == 0;
}

// Whether the vector body applies: vector_loads on, V % 4 == 0, both pointers 4-element aligned.
bool use_vec(const at::Tensor& input, const at::Tensor& labels) {
  return cuda_path_enabled("vector_loads") && input.size(2) % kVec == 0 && aligned_for_vec(input) &&
         aligned_for_vec(labels);
}

// Block rows of one accumulate pass.
struct Partials {
  at::Tensor sums, counts, flags;
};

Partials make_partials(const at::Tensor& input, int64_t rows, int64_t K) {
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Partials p;
  p.sums = at::empty({rows * K * 2}, input.options().dtype(acc));
  p.counts = at::empty({rows * K}, input.options().dtype(at::kInt));
  p.flags = at::empty({rows}, input.options().dtype(at::kInt));
  return p;
}

FastArgs fast_args(const at::Tensor& input, const LossParams& prm, int64_t K, int64_t blocks,
                   const Partials& p) {
  FastArgs a;
  a.V = input.size(2);
  a.K = K;
  a.planes = input.size(0) * input.size(1);
  a.blocks = blocks;
  a.act = prm.activation;
  a.squared = uses_pow(prm);
  a.partial_sums = p.sums.data_ptr();
  a.partial_counts = reinterpret_cast<uint32_t*>(p.counts.data_ptr<int>());
  a.block_flags = p.flags.data_ptr<int>();
  return a;
}

template <typename in_t, typename lab_t, bool VEC>
void launch_accumulate_fast(const at::Tensor& input, const at::Tensor& labels, const FastArgs& a,
                            size_t smem, cudaStream_t stream) {
  auto kernel = accumulate_fast_kernel<in_t, lab_t, VEC>;
  ensure_smem_limit(reinterpret_cast<const void*>(kernel), smem);
  kernel<<<dim3(unsigned(a.blocks), unsigned(a.planes)), kThreads, smem, stream>>>(
      input.data_ptr<in_t>(), labels.data_ptr<lab_t>(), a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
void launch_reduce_fast(const FastArgs& a, at::Tensor& stats, const at::Tensor& invalid,
                        cudaStream_t stream) {
  const int64_t n = a.planes * a.K;
  reduce_fast_kernel<acc_t><<<unsigned(plan_ceil_div(n, 256)), 256, 0, stream>>>(
      a, stats.data_ptr<double>(), invalid.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename in_t, typename lab_t, bool VEC>
int64_t accumulate_resident(size_t smem) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const auto* kernel = reinterpret_cast<const void*>(accumulate_fast_kernel<in_t, lab_t, VEC>);
  return std::max<int64_t>(1, resident_per_sm(kernel, smem)) * sms;
}

template <typename in_t, typename lab_t, bool VEC>
void accumulate_fast_typed(const at::Tensor& input, const at::Tensor& labels, const LossParams& prm,
                           int64_t K, at::Tensor& stats, const at::Tensor& invalid, size_t smem) {
  using acc_t = typename AccType<in_t>::type;
  const int64_t V = input.size(2), planes = input.size(0) * input.size(1);
  const int64_t blocks = accumulate_blocks(V, planes, accumulate_resident<in_t, lab_t, VEC>(smem),
                                           cuda_forced_blocks_per_plane());
  const Partials p = make_partials(input, planes * blocks, K);
  const FastArgs a = fast_args(input, prm, K, blocks, p);
  auto stream = at::cuda::getCurrentCUDAStream();
  launch_accumulate_fast<in_t, lab_t, VEC>(input, labels, a, smem, stream);
  launch_reduce_fast<acc_t>(a, stats, invalid, stream);
}

// Dynamic shared memory of the kernels here for a table of K labels, or 0 when it does not fit.
size_t fast_smem(int64_t K, size_t acc_size, bool with_reduce) {
  size_t smem = table_bytes(K, acc_size);
  if (with_reduce) smem = std::max(smem, kReduceSmem);
  const size_t smem_max = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  return smem <= smem_max ? smem : 0;
}

// Whether a cooperative launch could not be made for a reason the fallback handles; any other
// error raises. The error of the failed launch is cleared.
bool cooperative_refused(cudaError_t err) {
  if (err == cudaSuccess) return false;
  if (err == cudaErrorCooperativeLaunchTooLarge || err == cudaErrorNotSupported) {
    (void)cudaGetLastError();
    return true;
  }
  C10_CUDA_CHECK(err);
  return false;
}

template <typename Kernel, typename... Args>
cudaError_t launch_cooperative(Kernel kernel, dim3 grid, size_t smem, cudaStream_t stream,
                               Args... args) {
  if (coop_test_switch() == "refused") return cudaErrorCooperativeLaunchTooLarge;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

template <typename in_t, typename lab_t, bool VEC>
ForwardStatus forward_fast_typed(const at::Tensor& input, const at::Tensor& labels,
                                 const LossParams& prm, int64_t K, at::Tensor& stats,
                                 at::Tensor& invalid, at::Tensor& loss, at::Tensor& coef,
                                 size_t smem) {
  using acc_t = typename AccType<in_t>::type;
  const int64_t B = input.size(0), C = input.size(1), V = input.size(2), P = B * C;
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const int64_t sms = props->multiProcessorCount;
  const bool coop_supported = coop_supported_here();
  auto coop_kernel = forward_coop_kernel<in_t, lab_t, VEC>;
  auto fin_kernel = finalize_coop_kernel<acc_t>;
  const auto* coop_ptr = reinterpret_cast<const void*>(coop_kernel);
  const int64_t coop_resident = coop_supported ? resident_per_sm(coop_ptr, smem) * sms : 0;
  const int64_t forced = cuda_forced_blocks_per_plane();
  ForwardPlan plan =
      plan_forward(V, P, cuda_path_enabled("coop_forward"), cuda_path_enabled("split_forward"),
                   coop_supported, coop_resident, accumulate_resident<in_t, lab_t, VEC>(smem), forced);
  auto stream = at::cuda::getCurrentCUDAStream();
  // The finalisation's buffers (no launch: the caching allocator).
  static_assert(sizeof(PlaneResult) % sizeof(double) == 0, "PlaneResult must pack into doubles");
  const int64_t pr_doubles = P * int64_t(sizeof(PlaneResult) / sizeof(double));
  at::Tensor work = at::empty({pr_doubles + P + 1}, stats.options());
  at::Tensor plane_flags = at::empty({P}, input.options().dtype(at::kInt));
  invalid = at::empty({}, input.options().dtype(at::kInt));
  FinalArgs f;
  f.B = B;
  f.C = C;
  f.prm = prm;
  f.stats = stats.data_ptr<double>();
  f.pr = reinterpret_cast<PlaneResult*>(work.data_ptr<double>());
  f.w_blob = work.data_ptr<double>() + pr_doubles;
  f.w_global = f.w_blob + P;
  f.plane_flags = plane_flags.data_ptr<int>();
  f.invalid = invalid.data_ptr<int>();
  const bool loss_double = loss.scalar_type() == at::kDouble;
  f.loss_d = loss_double ? loss.data_ptr<double>() : nullptr;
  f.loss_f = loss_double ? nullptr : loss.data_ptr<float>();
  f.coef = coef.data_ptr<double>();

  if (plan.mode == kForwardCoop) {
    const Partials p = make_partials(input, P * plan.blocks, K);
    const FastArgs a = fast_args(input, prm, K, plan.blocks, p);
    const cudaError_t err =
        launch_cooperative(coop_kernel, dim3(unsigned(plan.blocks), unsigned(P)), smem, stream,
                           input.data_ptr<in_t>(), labels.data_ptr<lab_t>(), a, f);
    if (!cooperative_refused(err)) return kForwardDone;
    plan = plan_forward(V, P, false, true, false, 0, accumulate_resident<in_t, lab_t, VEC>(smem),
                        forced);
  }
  // Two launches: the accumulate pass, then the cooperative finalisation.
  const Partials p = make_partials(input, P * plan.blocks, K);
  const FastArgs a = fast_args(input, prm, K, plan.blocks, p);
  launch_accumulate_fast<in_t, lab_t, VEC>(input, labels, a, smem, stream);
  if (coop_supported) {
    const auto* fin_ptr = reinterpret_cast<const void*>(fin_kernel);
    const int64_t fin_resident = resident_per_sm(fin_ptr, kReduceSmem) * sms;
    if (fin_resident > 0) {
      const int64_t grid = std::min<int64_t>(P, fin_resident);
      const cudaError_t err =
          launch_cooperative(fin_kernel, dim3(unsigned(grid)), kReduceSmem, stream, a, f);
      if (!cooperative_refused(err)) return kForwardDone;
    }
  }
  // No cooperative finalisation: stats and the flag here, the default finalisation after.
  invalid.zero_();
  launch_reduce_fast<acc_t>(a, stats, invalid, stream);
  return kForwardAccumulated;
}

}  // namespace

bool accumulate_fast_cuda(const at::Tensor& input, const at::Tensor& labels, const LossParams& prm,
                          int64_t K, at::Tensor& stats, const at::Tensor& invalid) {
  if (prm.activation == kSoftmax || prm.with_ce || stats.size(3) != kNumStats) return false;
  if (!use_vec(input, labels)) return false;
  const size_t acc_size = input.scalar_type() == at::kDouble ? 8 : 4;
  const size_t smem = fast_smem(K, acc_size, false);
  if (smem == 0 || input.size(0) * input.size(1) > 65535) return false;
  BLOB_FAST_DISPATCH_TYPES(input.scalar_type(), labels.scalar_type(), [&] {
    accumulate_fast_typed<in_t, lab_t, true>(input, labels, prm, K, stats, invalid, smem);
  });
  return true;
}

ForwardStatus forward_fast_cuda(const at::Tensor& input, const at::Tensor& labels,
                                const LossParams& prm, int64_t K, int64_t bound, at::Tensor& stats,
                                at::Tensor& invalid, at::Tensor& loss, at::Tensor& coef,
                                const char* /*op*/) {
  if (!cuda_path_enabled("coop_forward") && !cuda_path_enabled("split_forward")) {
    return kForwardNotHandled;
  }
  // Covered: sigmoid / none Dice and Tversky with a dense table in shared memory, every id
  // checked against the table (bound == K).
  if (prm.activation == kSoftmax || prm.with_ce || bound != K || stats.size(3) != kNumStats ||
      coef.size(3) != kNumCoef) {
    return kForwardNotHandled;
  }
  const int64_t P = input.size(0) * input.size(1);
  const size_t acc_size = input.scalar_type() == at::kDouble ? 8 : 4;
  const c10::cuda::CUDAGuard guard(input.device());  // before fast_smem reads the device
  const size_t smem = fast_smem(K, acc_size, true);
  if (smem == 0 || P > 65535) return kForwardNotHandled;
  const bool vec = use_vec(input, labels);
  ForwardStatus status = kForwardNotHandled;
  BLOB_FAST_DISPATCH_TYPES(input.scalar_type(), labels.scalar_type(), [&] {
    status = vec ? forward_fast_typed<in_t, lab_t, true>(input, labels, prm, K, stats, invalid,
                                                         loss, coef, smem)
                 : forward_fast_typed<in_t, lab_t, false>(input, labels, prm, K, stats, invalid,
                                                          loss, coef, smem);
  });
  return status;
}

}  // namespace blob
