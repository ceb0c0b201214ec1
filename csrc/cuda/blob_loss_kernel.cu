// CUDA kernels of the blob loss operators.
//
// Forward (accumulate): one pass over the voxels. Each warp walks tiles of 256 voxels of one
// plane (lane L reads voxels base + 32 j + L, j < 8: every load is coalesced). Background
// voxels are summed in registers. A lane aggregates a run of equal non-zero labels and flushes
// it only when its label changes; a flush is warp-cooperative: the lanes flushing the same
// label are summed with a fixed xor-butterfly and one leader lane adds the sum to the warp's
// private table in shared memory. No atomics touch a hot bin and the order of every addition
// is fixed, so the result is bitwise reproducible. At the end of the block the 8 warp tables
// are merged in warp order into one partial row per block, and a small kernel sums the rows
// of each plane in block order, in double. Label ranges too large for shared memory use
// per-warp rows in global memory when deterministic algorithms are requested, else double
// atomics into the table (only at run flushes).
//
// Finalise: per-plane block reductions, one thread combining the planes (paper Eq. 2, 3),
// and one thread per label writing its coefficients; all formulas come from
// blob_loss_math.h, the header the CPU kernel uses. With max_label given nothing here syncs
// with the host; an id outside [0, max_label] sets a device flag that makes loss and gradient
// NaN.
//
// Backward: one pass, grad = grad_out * (a[l] + b[l] dpow(p)) * act'(x), with the plane's
// (a, b) table staged in shared memory. Softmax needs the per-voxel channel sum
// sum_j p_j dL/dp_j: its voxels re-read the C channels of a position from L1/L2.
#include <ATen/Dispatch.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "../blob_ops.h"
#include "accumulate_common.cuh"
#include "dice_ce.h"
#include "finalize_common.cuh"
#include "forward_fast.h"

namespace blob {
namespace {

// Sigmoid / none. Grid (blocks per plane, B * C).
template <typename scalar_t, typename label_t, bool SHARED>
__global__ void __launch_bounds__(kThreads)
    accumulate_elementwise_kernel(const scalar_t* __restrict__ x,
                                  const label_t* __restrict__ labels, int64_t V, int64_t K,
                                  int32_t act, bool squared, TableArgs ta, int* invalid) {
  using acc_t = typename AccType<scalar_t>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const int64_t plane = blockIdx.y;
  const int lane = threadIdx.x & 31;
  const WarpTable<acc_t> table = open_tables<acc_t, SHARED>(smem, ta, plane);
  const scalar_t* xp = x + plane * V;
  const label_t* lp = labels + plane * V;
  const int64_t warp_in_plane = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t stride = int64_t(gridDim.x) * kWarps * kTile;

  Run<acc_t> run;
  acc_t bg_s = 0, bg_q = 0;
  uint32_t bg_n = 0;
  bool bad = false;
  for (int64_t base = warp_in_plane * kTile; base < V; base += stride) {
    scalar_t xv[kItems];
    label_t lv[kItems];
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t i = base + j * 32 + lane;
      if (i < V) {
        xv[j] = xp[i];
        lv[j] = lp[i];
      }
    }
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      bool valid = base + j * 32 + lane < V;
      const int64_t k = valid ? int64_t(lv[j]) : 0;
      if (valid && !label_ok(k, K)) {
        bad = true;
        valid = false;
      }
      const acc_t p = valid ? activate<acc_t>(acc_t(xv[j]), act) : acc_t(0);
      const acc_t pq = squared ? p * p : p;
      const bool background = valid && k == 0;
      if (background) {  // in registers: never a flush, never an atomic
        bg_s += p;
        bg_q += pq;
        ++bg_n;
      }
      run.push(valid && !background, k, p, pq, table);
    }
  }
  run.close(table);
  bg_s = warp_sum<acc_t>(bg_s);
  bg_q = warp_sum<acc_t>(bg_q);
  const acc_t bg_nf = warp_sum<acc_t>(acc_t(bg_n));
  if (lane == 0 && bg_nf > acc_t(0)) table.add(0, bg_s, bg_q, bg_nf);
  if (bad) atomicExch(invalid, 1);
  close_tables<acc_t, SHARED>(smem, ta, plane);
}

// Softmax over C. Grid (blocks per batch element, B); a table row holds all C channels, keyed
// c * K + k. Channel 0's label is derived: 1 where no other channel has an instance.
// INF: the online softmax of the opt-in path softmax_inf (softmax_step).
template <typename scalar_t, typename label_t, bool SHARED, bool INF = false>
__global__ void __launch_bounds__(kThreads)
    accumulate_softmax_kernel(const scalar_t* __restrict__ x, const label_t* __restrict__ labels,
                              int64_t C, int64_t V, int64_t K, bool squared, TableArgs ta,
                              int* invalid) {
  using acc_t = typename AccType<scalar_t>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const int64_t b = blockIdx.y;
  const int lane = threadIdx.x & 31;
  const WarpTable<acc_t> table = open_tables<acc_t, SHARED>(smem, ta, b);
  const scalar_t* xb = x + b * C * V;
  const label_t* lb = labels + b * C * V;
  const int64_t warp_in_plane = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t stride = int64_t(gridDim.x) * kWarps * kTile;

  Run<acc_t> run;
  bool bad = false;
  for (int64_t base = warp_in_plane * kTile; base < V; base += stride) {
    acc_t mx[kItems], z[kItems];
    bool any[kItems];
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t i = base + j * 32 + lane;
      mx[j] = -INFINITY;
      z[j] = 0;
      any[j] = false;
      if (i < V) {
        for (int64_t c = 0; c < C; ++c)  // online max and sum
          softmax_step<INF, acc_t>(mx[j], z[j], acc_t(xb[c * V + i]));
      }
    }
    for (int64_t cc = 1; cc <= C; ++cc) {
      const int64_t c = cc == C ? 0 : cc;  // channels 1..C-1 first, then the derived channel 0
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int64_t i = base + j * 32 + lane;
        bool valid = i < V;
        int64_t k = 0;
        acc_t p = 0;
        if (valid) {
          if (c == 0) {
            k = any[j] ? 0 : 1;
          } else {
            k = int64_t(lb[c * V + i]);
            if (!label_ok(k, K)) {
              bad = true;
              valid = false;
            }
            any[j] = any[j] || k != 0;
          }
          p = act_exp(acc_t(xb[c * V + i]) - mx[j]) / z[j];
        }
        run.push(valid, c * K + k, p, squared ? p * p : p, table);
      }
    }
  }
  run.close(table);
  if (bad) atomicExch(invalid, 1);
  close_tables<acc_t, SHARED>(smem, ta, b);
}

// Sums the partial rows of each plane in row order: stats[plane][e] = sum_r partial[plane][r][e].
template <typename acc_t>
__global__ void reduce_rows_kernel(const acc_t* __restrict__ partial, int64_t planes, int64_t rows,
                                   int64_t entries, double* __restrict__ stats) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= planes * entries) return;
  const int64_t plane = i / entries, e = i % entries;
  const acc_t* src = partial + plane * rows * entries + e;
  double v = 0.0;
  for (int64_t r = 0; r < rows; ++r) v += double(src[r * entries]);
  stats[i] = v;
}

// ---- finalisation -------------------------------------------------------------------------

__global__ void __launch_bounds__(kReduceThreads)
    plane_summary_kernel(const double* __restrict__ stats, int64_t C, int64_t K, LossParams prm,
                         PlaneResult* __restrict__ out) {
  __shared__ double buf[kReduceThreads][4];
  plane_summary(stats, blockIdx.x, C, K, prm, buf, out);
}

__global__ void combine_kernel(const PlaneResult* __restrict__ pr, int64_t B, int64_t C,
                               LossParams prm, const int* __restrict__ invalid,
                               double* __restrict__ w_blob, double* __restrict__ w_global,
                               double* __restrict__ loss) {
  const double l = combine_planes(pr, B, C, prm, w_blob, w_global);
  *loss = *invalid ? NAN : l;
}

__global__ void coef_kernel(const double* __restrict__ stats, const PlaneResult* __restrict__ pr,
                            const double* __restrict__ w_blob, const double* __restrict__ w_global,
                            const int* __restrict__ invalid, int64_t planes, int64_t K,
                            LossParams prm, double* __restrict__ coef) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= planes * K) return;
  label_coef_entry(i, stats, pr, w_blob, w_global, invalid, K, prm, coef);
}

// ---- backward -----------------------------------------------------------------------------

constexpr int64_t kCoefSmemBytes = 48 * 1024;

template <typename acc_t>
__device__ __forceinline__ void load_coef(const double* __restrict__ coef, int64_t n, bool staged,
                                          acc_t* smem) {
  if (staged) {
    for (int64_t i = threadIdx.x; i < n * kNumCoef; i += blockDim.x) smem[i] = acc_t(coef[i]);
  }
  __syncthreads();
}

template <typename acc_t>
__device__ __forceinline__ void coef_of(const double* __restrict__ coef, const acc_t* smem,
                                        bool staged, int64_t key, acc_t& a, acc_t& b) {
  if (staged) {
    a = smem[key * kNumCoef];
    b = smem[key * kNumCoef + 1];
  } else {
    a = acc_t(coef[key * kNumCoef]);
    b = acc_t(coef[key * kNumCoef + 1]);
  }
}

// Sigmoid / none. Grid (blocks per plane, B * C).
template <typename scalar_t, typename label_t>
__global__ void __launch_bounds__(kThreads)
    backward_elementwise_kernel(const double* __restrict__ grad_out, const scalar_t* __restrict__ x,
                                const label_t* __restrict__ labels, const double* __restrict__ coef,
                                int64_t V, int64_t K, int32_t act, bool squared, bool staged,
                                scalar_t* __restrict__ grad_x) {
  using acc_t = typename AccType<scalar_t>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* cs = reinterpret_cast<acc_t*>(smem_raw);
  const int64_t plane = blockIdx.y;
  const double* cp = coef + plane * K * kNumCoef;
  load_coef<acc_t>(cp, K, staged, cs);
  const acc_t go = acc_t(*grad_out);
  const scalar_t* xp = x + plane * V;
  const label_t* lp = labels + plane * V;
  scalar_t* gp = grad_x + plane * V;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x * kItems;
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x * kItems + threadIdx.x; base < V;
       base += stride) {
    scalar_t xv[kItems];
    label_t lv[kItems];
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t i = base + int64_t(j) * blockDim.x;
      if (i < V) {
        xv[j] = xp[i];
        lv[j] = lp[i];
      }
    }
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t i = base + int64_t(j) * blockDim.x;
      if (i < V) {
        const int64_t k = int64_t(lv[j]);
        acc_t a = NAN, bb = NAN;
        if (label_ok(k, K)) coef_of<acc_t>(cp, cs, staged, k, a, bb);
        const acc_t p = activate<acc_t>(acc_t(xv[j]), act);
        gp[i] = scalar_t(go * grad_wrt_p(p, a, bb, squared) * elementwise_act_grad(p, act));
      }
    }
  }
}

// Softmax. Grid (blocks per batch element, B). Per position: the channel max and sum, the
// per-channel dL/dp, their p-weighted sum, then the gradient of every channel.
template <typename scalar_t, typename label_t, bool INF = false>
__global__ void __launch_bounds__(kThreads)
    backward_softmax_kernel(const double* __restrict__ grad_out, const scalar_t* __restrict__ x,
                            const label_t* __restrict__ labels, const double* __restrict__ coef,
                            int64_t C, int64_t V, int64_t K, bool squared, bool staged,
                            scalar_t* __restrict__ grad_x) {
  using acc_t = typename AccType<scalar_t>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* cs = reinterpret_cast<acc_t*>(smem_raw);
  const int64_t b = blockIdx.y;
  const double* cb = coef + b * C * K * kNumCoef;
  load_coef<acc_t>(cb, C * K, staged, cs);
  const acc_t go = acc_t(*grad_out);
  const scalar_t* xb = x + b * C * V;
  const label_t* lb = labels + b * C * V;
  scalar_t* gb = grad_x + b * C * V;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < V; i += stride) {
    acc_t mx = -INFINITY, z = 0;
    bool any = false;
    for (int64_t c = 0; c < C; ++c) {
      softmax_step<INF, acc_t>(mx, z, acc_t(xb[c * V + i]));
      if (c > 0) any = any || lb[c * V + i] != 0;
    }
    const acc_t inv_z = acc_t(1) / z;
    // dL/dp_c for every channel, and sum_c p_c dL/dp_c.
    acc_t dot = 0;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t k = c == 0 ? (any ? 0 : 1) : int64_t(lb[c * V + i]);
      acc_t a = NAN, bb = NAN;
      if (label_ok(k, K)) coef_of<acc_t>(cb, cs, staged, c * K + k, a, bb);
      const acc_t p = act_exp(acc_t(xb[c * V + i]) - mx) * inv_z;
      dot += p * grad_wrt_p(p, a, bb, squared);
    }
    for (int64_t c = 0; c < C; ++c) {
      const int64_t k = c == 0 ? (any ? 0 : 1) : int64_t(lb[c * V + i]);
      acc_t a = NAN, bb = NAN;
      if (label_ok(k, K)) coef_of<acc_t>(cb, cs, staged, c * K + k, a, bb);
      const acc_t p = act_exp(acc_t(xb[c * V + i]) - mx) * inv_z;
      gb[c * V + i] = scalar_t(go * p * (grad_wrt_p(p, a, bb, squared) - dot));
    }
  }
}

// ---- host side ----------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

#define BLOB_DISPATCH_TYPES(INPUT, LABELS, ...)                                       \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, INPUT, "blob_cuda", [&] { \
    using in_t = scalar_t;                                                            \
    AT_DISPATCH_V2(LABELS, "blob_cuda_labels", AT_WRAP([&] {                          \
                     using lab_t = scalar_t;                                          \
                     __VA_ARGS__();                                                   \
                   }),                                                                \
                   at::kByte, at::kShort, at::kInt, at::kLong);                       \
  })

// Resident blocks per SM of a kernel with `smem` bytes of dynamic shared memory (opting in to
// more than 48 KB where needed).
template <typename Kernel>
int blocks_per_sm(Kernel kernel, size_t smem) {
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  }
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, smem));
  return std::max(n, 1);
}

template <typename in_t, typename lab_t, bool SHARED>
void launch_accumulate(const at::Tensor& input, const at::Tensor& labels, const LossParams& prm,
                       int64_t K, at::Tensor& stats, at::Tensor& invalid, size_t smem,
                       bool atomics) {
  using acc_t = typename AccType<in_t>::type;
  const bool softmax = prm.activation == kSoftmax;
  const int64_t B = input.size(0), C = input.size(1), V = input.size(2);
  const int64_t planes = softmax ? B : B * C;
  const int64_t entries = (softmax ? C : 1) * K * kNumStats;
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const bool inf = softmax && cuda_path_enabled("softmax_inf");
  auto softmax_kernel = inf ? accumulate_softmax_kernel<in_t, lab_t, SHARED, true>
                            : accumulate_softmax_kernel<in_t, lab_t, SHARED, false>;
  // The launch geometry is the default kernel's also for softmax_inf (whose kernel uses more
  // registers, so fewer resident blocks): the same blocks per plane, the same bits for finite
  // logits. The INF kernel only needs the opt-in to more than 48 KB of shared memory.
  const int per_sm =
      softmax ? blocks_per_sm(accumulate_softmax_kernel<in_t, lab_t, SHARED, false>,
                              SHARED ? smem : 0)
              : blocks_per_sm(accumulate_elementwise_kernel<in_t, lab_t, SHARED>, SHARED ? smem : 0);
  if (inf && SHARED && smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(softmax_kernel,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  }
  const int64_t target = int64_t(per_sm) * props->multiProcessorCount;
  const int64_t max_blocks = std::max<int64_t>(1, ceil_div(V, int64_t(kTile) * kWarps));
  int64_t blocks = std::min(max_blocks, std::max<int64_t>(1, ceil_div(target, planes)));
  int64_t chunk = planes;  // planes per launch
  at::Tensor partial;
  const auto acc_dtype = std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;
  if (SHARED) {
    partial = at::empty({planes * blocks * entries}, input.options().dtype(acc_dtype));
  } else if (!atomics) {
    // Deterministic, large label range: one zeroed row per warp, within warp_rows_budget()
    // (256 MiB): fewer blocks per plane, and the planes in chunks, one launch each, when even one
    // block per plane is too much. Each plane's arithmetic and its order are the same either way.
    const WarpRowPlan plan =
        plan_warp_rows(planes, entries * int64_t(sizeof(acc_t)), kWarps, blocks, warp_rows_budget());
    blocks = plan.blocks;
    chunk = plan.planes_per_launch;
    partial = at::zeros({chunk * blocks * kWarps * entries}, input.options().dtype(acc_dtype));
  }
  const int64_t plane_stride = (softmax ? C : 1) * V;  // voxels of one plane (all channels)
  auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t p0 = 0; p0 < planes; p0 += chunk) {
    const int64_t n = std::min(chunk, planes - p0);
    if (p0 > 0) partial.zero_();
    TableArgs ta{partial.defined() ? partial.data_ptr() : nullptr,
                 stats.data_ptr<double>() + p0 * entries, entries, atomics};
    const in_t* x = input.data_ptr<in_t>() + p0 * plane_stride;
    const lab_t* lab = labels.data_ptr<lab_t>() + p0 * plane_stride;
    const dim3 grid{static_cast<unsigned>(blocks), static_cast<unsigned>(n)};
    if (softmax) {
      softmax_kernel<<<grid, kThreads, SHARED ? smem : 0, stream>>>(
          x, lab, C, V, K, uses_pow(prm), ta, invalid.data_ptr<int>());
    } else {
      accumulate_elementwise_kernel<in_t, lab_t, SHARED>
          <<<grid, kThreads, SHARED ? smem : 0, stream>>>(x, lab, V, K, prm.activation,
                                                          uses_pow(prm), ta,
                                                          invalid.data_ptr<int>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (partial.defined()) {
      const int64_t rows = SHARED ? blocks : blocks * kWarps;
      reduce_rows_kernel<acc_t><<<unsigned(ceil_div(n * entries, 256)), 256, 0, stream>>>(
          static_cast<const acc_t*>(partial.data_ptr()), n, rows, entries,
          stats.data_ptr<double>() + p0 * entries);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

// Ids are checked against K (the CUDA kernels have no separate bound; the host makes K equal to
// max_label + 1 except for softmax with max_label = 0, whose table needs 2 entries).
bool accumulate_cuda(const at::Tensor& input, const at::Tensor& labels, const LossParams& prm,
                     int64_t K, int64_t /*bound*/, at::Tensor& stats,
                     const at::Tensor& invalid_flag, const char* op) {
  const c10::cuda::CUDAGuard guard(input.device());
  TORCH_CHECK_VALUE(input.size(0) <= 65535 && input.size(0) * input.size(1) <= 65535, op,
                    " (CUDA): B * C must be at most 65535, got ",
                    num(input.size(0) * input.size(1)));
  // Blob Dice+CE reaches the kernels only on the opt-in path fused_dice_ce (cuda_fuses_dice_ce).
  if (prm.with_ce) return accumulate_cuda_ce(input, labels, prm, K, stats, invalid_flag);
  at::Tensor invalid = invalid_flag;
  const int64_t C = input.size(1);
  const size_t acc_size = input.scalar_type() == at::kDouble ? 8 : 4;
  const size_t entries = size_t((prm.activation == kSoftmax ? C : 1) * K * kNumStats);
  const size_t smem = kWarps * entries * acc_size;
  const size_t smem_max = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  const bool shared = smem <= smem_max;
  const bool atomics = !shared && !at::globalContext().deterministicAlgorithms();
  // The shared-memory and per-warp-row paths write every entry of stats (reduce_rows_kernel);
  // only the atomics path adds into it and needs it zeroed.
  if (atomics) stats.zero_();
  // Opt-in (BLOBBENCH_CUDA_PATHS=vector_loads, forward_fast.cu): false where it does not apply.
  if (shared && accumulate_fast_cuda(input, labels, prm, K, stats, invalid)) return true;
  BLOB_DISPATCH_TYPES(input.scalar_type(), labels.scalar_type(), [&] {
    if (shared) {
      launch_accumulate<in_t, lab_t, true>(input, labels, prm, K, stats, invalid, smem, false);
    } else {
      launch_accumulate<in_t, lab_t, false>(input, labels, prm, K, stats, invalid, 0, atomics);
    }
  });
  return true;
}

// The combine kernel writes a float64 loss; a float32 output is converted by one copy.
void finalize_cuda(const at::Tensor& stats, const at::Tensor& invalid, const LossParams& prm,
                   at::Tensor& loss_out, at::Tensor& coef, const char* /*op*/) {
  if (prm.with_ce || cuda_path_enabled("parallel_finalize")) {
    finalize_cuda_parallel(stats, invalid, prm, loss_out, coef);  // dice_ce_kernel.cu
    return;
  }
  at::Tensor loss =
      loss_out.scalar_type() == at::kDouble ? loss_out : at::empty({}, stats.options());
  const c10::cuda::CUDAGuard guard(stats.device());
  const int64_t B = stats.size(0), C = stats.size(1), K = stats.size(2), P = B * C;
  auto stream = at::cuda::getCurrentCUDAStream();
  static_assert(sizeof(PlaneResult) % sizeof(double) == 0, "PlaneResult must pack into doubles");
  auto work =
      at::empty({P * int64_t(sizeof(PlaneResult) / sizeof(double)) + P + 1}, stats.options());
  auto* pr = reinterpret_cast<PlaneResult*>(work.data_ptr<double>());
  double* w_blob = work.data_ptr<double>() + P * int64_t(sizeof(PlaneResult) / sizeof(double));
  double* w_global = w_blob + P;
  plane_summary_kernel<<<unsigned(P), kReduceThreads, 0, stream>>>(stats.data_ptr<double>(), C, K,
                                                                   prm, pr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  combine_kernel<<<1, 1, 0, stream>>>(pr, B, C, prm, invalid.data_ptr<int>(), w_blob, w_global,
                                      loss.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  coef_kernel<<<unsigned(ceil_div(P * K, 256)), 256, 0, stream>>>(
      stats.data_ptr<double>(), pr, w_blob, w_global, invalid.data_ptr<int>(), P, K, prm,
      coef.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!loss.is_same(loss_out)) loss_out.copy_(loss);
}

// Ids outside the coefficient table give a NaN gradient (no sync to raise).
bool backward_cuda(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& labels,
                   const at::Tensor& coef, const LossParams& prm, at::Tensor& grad_input,
                   const char* op) {
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t B = input.size(0), C = input.size(1), V = input.size(2), K = coef.size(2);
  TORCH_CHECK_VALUE(B * C <= 65535, op, " (CUDA): B * C must be at most 65535, got ", num(B * C));
  if (prm.with_ce) return backward_cuda_ce(grad_out, input, labels, coef, prm, grad_input);
  const bool softmax = prm.activation == kSoftmax;
  const int64_t planes = softmax ? B : B * C;
  const int64_t n_coef = (softmax ? C : 1) * K;
  const size_t acc_size = input.scalar_type() == at::kDouble ? 8 : 4;
  const size_t smem_needed = size_t(n_coef) * kNumCoef * acc_size;
  const bool staged = smem_needed <= size_t(kCoefSmemBytes);
  const size_t smem = staged ? smem_needed : 0;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  auto stream = at::cuda::getCurrentCUDAStream();
  auto go = grad_out.reshape({}).to(input.device(), at::kDouble);
  BLOB_DISPATCH_TYPES(input.scalar_type(), labels.scalar_type(), [&] {
    if (!softmax) {
      const int64_t per_block = int64_t(kThreads) * kItems;
      const int64_t blocks = std::min(ceil_div(V, per_block),
                                      std::max<int64_t>(1, ceil_div(int64_t(sms) * 8, planes)));
      backward_elementwise_kernel<in_t, lab_t>
          <<<dim3(unsigned(blocks), unsigned(planes)), kThreads, smem, stream>>>(
              go.data_ptr<double>(), input.data_ptr<in_t>(), labels.data_ptr<lab_t>(),
              coef.data_ptr<double>(), V, K, prm.activation, prm.squared_pred, staged,
              grad_input.data_ptr<in_t>());
    } else {
      const int64_t blocks = std::min(ceil_div(V, int64_t(kThreads)),
                                      std::max<int64_t>(1, ceil_div(int64_t(sms) * 8, planes)));
      auto kernel = cuda_path_enabled("softmax_inf") ? backward_softmax_kernel<in_t, lab_t, true>
                                                     : backward_softmax_kernel<in_t, lab_t, false>;
      kernel<<<dim3(unsigned(blocks), unsigned(planes)), kThreads, smem, stream>>>(
              go.data_ptr<double>(), input.data_ptr<in_t>(), labels.data_ptr<lab_t>(),
              coef.data_ptr<double>(), C, V, K, prm.squared_pred, staged,
              grad_input.data_ptr<in_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return true;
}

// By default blob Dice+CE runs these Dice kernels and adds the cross-entropy with ATen ops
// (ops/blob_drivers.cpp, dice_ce_forward_composite); the fused kernels of dice_ce_kernel.cu only on the
// opt-in path fused_dice_ce, until they are verified on a GPU.
bool cuda_fuses_dice_ce() { return cuda_path_enabled("fused_dice_ce"); }

const DeviceKernels kCudaKernels{&accumulate_cuda, &finalize_cuda, &backward_cuda,
                                 /*uses_invalid_flag=*/true, /*fused_ce=*/&cuda_fuses_dice_ce,
                                 /*forward=*/&forward_fast_cuda};  // opt-in: coop/split_forward

}  // namespace

TORCH_LIBRARY_IMPL(blob, CUDA, m) {
  using Ops = DeviceOps<kCudaKernels>;
  m.impl("dice", &Ops::dice);
  m.impl("tversky", &Ops::tversky);
  m.impl("label_stats", &Ops::label_stats);
  m.impl("_dice_forward", &Ops::dice_forward);
  m.impl("_dice_backward", &Ops::dice_backward);
  m.impl("_tversky_forward", &Ops::tversky_forward);
  m.impl("_tversky_backward", &Ops::tversky_backward);
  m.impl("dice_ce", &Ops::dice_ce);
  m.impl("_dice_ce_forward", &Ops::dice_ce_forward);
  m.impl("_dice_ce_backward", &Ops::dice_ce_backward);
}

}  // namespace blob
