// Opt-in CUDA paths of issue 19 (BLOBBENCH_CUDA_PATHS; docs/design.md section 5.6). Written
// and compiled without a GPU: not yet run on one. The default path (blob_loss_kernel.cu) calls
// in here only when a path is switched on.
//
// parallel_finalize: the finalisation over the (B, C, K) table, parallel over labels. The
// default runs one 256-thread block per plane over all K labels, twice (totals, then the blob
// terms): several ms for K = 10^6 (an estimate, not measured). Here each plane's labels are cut
// into fixed chunks of kLabelsPerBlock, one block each: (1) every block reduces its chunk's
// totals (fixed-order block reduction), (2) one thread per plane adds the chunk totals in chunk
// order, (3) every block evaluates the blob terms of its chunk against the plane's totals, (4)
// one thread per plane adds those in chunk order and forms the plane's result, then a combine
// and a coefficient kernel that are copies of the default path's combine_kernel and coef_kernel
// (blob_loss_kernel.cu; here templated on Dice+CE, the default's left untouched). The chunking
// depends on K only, not on the device, so the result is bitwise reproducible (it differs from
// the default path by rounding: another summation order). Formulas: blob_loss_math.h, as
// everywhere.
//
// fused_dice_ce: blob Dice+CE in the kernels, as on the CPU (cpu/kernels_impl.h): the
// accumulate pass sums five values per label, (S, P, N, E^g, E^b), E^g / E^b each voxel's BCE
// against [l > 0] in the form of the global term and of the blob terms (bce_logits / bce_prob
// of blob_loss_math.h, computed in the accumulator type); the finalisation (the parallel one
// above, with the BCE parts exactly as finalize_host adds them) runs on the device; the backward
// reads four coefficients per label (voxel_grad<true> of the CPU). Separate kernels from the Dice
// ones, whose register use does not change.
#include <ATen/Dispatch.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "../blob_ops.h"
#include "accumulate_common.cuh"
#include "dice_ce.h"

namespace blob {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- parallel finalisation ----------------------------------------------------------------

constexpr int kFinThreads = 256;
constexpr int64_t kLabelsPerBlock = 16 * kFinThreads;
// Values per chunk: the totals (s_all, p_all, s_fg, n_fg, BCE sum of the global form) and the
// blob sums (loss_sum, count, bg_lin, bg_pow, sum of the instances' BCE terms).
constexpr int kFinVals = 5;

// Fixed-order block reduction of kFinVals doubles per thread; the result is in vals of every
// thread.
__device__ void block_reduce5(double (&vals)[kFinVals], double (*buf)[kFinVals]) {
#pragma unroll
  for (int i = 0; i < kFinVals; ++i) buf[threadIdx.x][i] = vals[i];
  __syncthreads();
  for (int half = kFinThreads / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half)
#pragma unroll
      for (int i = 0; i < kFinVals; ++i) buf[threadIdx.x][i] += buf[threadIdx.x + half][i];
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kFinVals; ++i) vals[i] = buf[0][i];
  __syncthreads();
}

// (1) Grid (chunks, planes): the totals of each chunk of labels.
template <bool CE>
__global__ void __launch_bounds__(kFinThreads)
    chunk_totals_kernel(const double* __restrict__ stats, int64_t K, int64_t chunks,
                        double* __restrict__ part) {
  constexpr int ns = CE ? kNumStatsCE : kNumStats;
  __shared__ double buf[kFinThreads][kFinVals];
  const int64_t plane = blockIdx.y, chunk = blockIdx.x;
  const double* st = stats + plane * K * ns;
  const int64_t k0 = chunk * kLabelsPerBlock;
  const int64_t k1 = k0 + kLabelsPerBlock < K ? k0 + kLabelsPerBlock : K;
  PlaneTotals t{0, 0, 0, 0};
  double ce = 0.0;
  for (int64_t k = k0 + threadIdx.x; k < k1; k += kFinThreads) {
    add_to_totals(t, k, st + k * ns);
    if (CE) ce += st[k * ns + 3];
  }
  double v[kFinVals] = {t.s_all, t.p_all, t.s_fg, t.n_fg, ce};
  block_reduce5(v, buf);
  if (threadIdx.x == 0) {
    double* out = part + (plane * chunks + chunk) * kFinVals;
#pragma unroll
    for (int i = 0; i < kFinVals; ++i) out[i] = v[i];
  }
}

// (2), (4) One thread per plane: the plane's chunk values added in chunk order.
__device__ void sum_chunks(const double* part, int64_t plane, int64_t chunks,
                           double (&v)[kFinVals]) {
#pragma unroll
  for (int i = 0; i < kFinVals; ++i) v[i] = 0.0;
  const double* src = part + plane * chunks * kFinVals;
  for (int64_t c = 0; c < chunks; ++c)
#pragma unroll
    for (int i = 0; i < kFinVals; ++i) v[i] += src[c * kFinVals + i];
}

__global__ void plane_totals_kernel(const double* __restrict__ part, int64_t planes,
                                    int64_t chunks, double* __restrict__ totals) {
  const int64_t plane = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (plane >= planes) return;
  double v[kFinVals];
  sum_chunks(part, plane, chunks, v);
#pragma unroll
  for (int i = 0; i < kFinVals; ++i) totals[plane * kFinVals + i] = v[i];
}

__device__ __forceinline__ PlaneTotals totals_of(const double* totals, int64_t plane) {
  const double* t = totals + plane * kFinVals;
  return PlaneTotals{t[0], t[1], t[2], t[3]};
}

// (3) Grid (chunks, planes): the blob terms of each chunk's labels (k > 0 with N_k > 0).
template <bool CE>
__global__ void __launch_bounds__(kFinThreads)
    chunk_blob_kernel(const double* __restrict__ stats, int64_t C, int64_t K, int64_t chunks,
                      LossParams prm, const double* __restrict__ totals,
                      double* __restrict__ part) {
  constexpr int ns = CE ? kNumStatsCE : kNumStats;
  __shared__ double buf[kFinThreads][kFinVals];
  const int64_t plane = blockIdx.y, chunk = blockIdx.x;
  const double* st = stats + plane * K * ns;
  const PlaneTotals t = totals_of(totals, plane);
  const bool has_blob_term = !(prm.activation == kSoftmax && plane % C == 0);
  PlaneBlob pb{0, 0, 0, 0};
  double ce = 0.0;
  if (has_blob_term) {
    const int64_t k0 = chunk > 0 ? chunk * kLabelsPerBlock : 1;
    const int64_t k1 = (chunk + 1) * kLabelsPerBlock < K ? (chunk + 1) * kLabelsPerBlock : K;
    for (int64_t k = k0 + threadIdx.x; k < k1; k += kFinThreads) {
      const double* stk = st + k * ns;
      if (stk[2] > 0.0) {
        add_blob(pb, blob_term(t, st, stk, prm));
        if (CE) ce += blob_ce(t, st, stk, prm);
      }
    }
  }
  double v[kFinVals] = {pb.loss_sum, pb.count, pb.bg_lin, pb.bg_pow, ce};
  block_reduce5(v, buf);
  if (threadIdx.x == 0) {
    double* out = part + (plane * chunks + chunk) * kFinVals;
#pragma unroll
    for (int i = 0; i < kFinVals; ++i) out[i] = v[i];
  }
}

// (4) One thread per plane: its PlaneResult, as finalize_host forms it.
template <bool CE>
__global__ void plane_result_kernel(const double* __restrict__ stats, int64_t planes, int64_t K,
                                    int64_t chunks, LossParams prm,
                                    const double* __restrict__ totals,
                                    const double* __restrict__ part, PlaneResult* __restrict__ out) {
  constexpr int ns = CE ? kNumStatsCE : kNumStats;
  const int64_t plane = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (plane >= planes) return;
  double v[kFinVals];
  sum_chunks(part, plane, chunks, v);
  PlaneResult r;
  r.totals = totals_of(totals, plane);
  r.global_loss = global_term(r.totals, stats + plane * K * ns, prm).loss;
  r.blob = PlaneBlob{v[0], v[1], v[2], v[3]};
  if (CE) {
    // Every term is lambda_dice * Dice + lambda_ce * BCE; the derivative sums stay the Dice ones.
    r.global_loss = prm.lambda_dice * r.global_loss +
                    prm.lambda_ce * global_ce(totals[plane * kFinVals + 4], prm);
    r.blob.loss_sum = prm.lambda_dice * r.blob.loss_sum + prm.lambda_ce * v[4];
  }
  out[plane] = r;
}

__global__ void combine_planes_kernel(const PlaneResult* __restrict__ pr, int64_t B, int64_t C,
                                      LossParams prm, const int* __restrict__ invalid,
                                      double* __restrict__ w_blob, double* __restrict__ w_global,
                                      double* __restrict__ loss) {
  const double l = combine_planes(pr, B, C, prm, w_blob, w_global);
  *loss = *invalid ? NAN : l;
}

// One thread per (plane, label): label_coef, and for Dice+CE label_ce_coef, as finalize_host.
template <bool CE>
__global__ void label_coef_kernel(const double* __restrict__ stats,
                                  const PlaneResult* __restrict__ pr,
                                  const double* __restrict__ w_blob,
                                  const double* __restrict__ w_global,
                                  const int* __restrict__ invalid, int64_t planes, int64_t K,
                                  LossParams prm, double* __restrict__ coef) {
  constexpr int ns = CE ? kNumStatsCE : kNumStats;
  constexpr int nc = CE ? kNumCoefCE : kNumCoef;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= planes * K) return;
  const int64_t plane = i / K, k = i % K;
  const double* st = stats + plane * K * ns;
  double* ck = coef + i * nc;
  const PlaneResult& r = pr[plane];
  if (!CE) {
    label_coef(k, st, st + k * ns, r.totals, r.blob, *w_global, w_blob[plane], prm, ck);
  } else {
    const double ld = prm.lambda_dice;
    label_coef(k, st, st + k * ns, r.totals, r.blob, ld * *w_global, ld * w_blob[plane], prm, ck);
    label_ce_coef(k, st + k * ns, r.blob.count, *w_global, w_blob[plane], prm, ck + 2);
  }
  if (*invalid) {
#pragma unroll
    for (int j = 0; j < nc; ++j) ck[j] = NAN;
  }
}

template <bool CE>
void launch_finalize(const at::Tensor& stats, const at::Tensor& invalid, const LossParams& prm,
                     at::Tensor& loss, at::Tensor& coef) {
  const int64_t B = stats.size(0), C = stats.size(1), K = stats.size(2), P = B * C;
  const int64_t chunks = ceil_div(K, kLabelsPerBlock);
  constexpr int64_t pr_doubles = int64_t(sizeof(PlaneResult) / sizeof(double));
  static_assert(sizeof(PlaneResult) % sizeof(double) == 0, "PlaneResult must pack into doubles");
  // part_t, part_b: (P, chunks, 5); totals (P, 5); plane results; w_blob (P); w_global (1)
  auto work =
      at::empty({2 * P * chunks * kFinVals + P * kFinVals + P * pr_doubles + P + 1}, stats.options());
  double* part_t = work.data_ptr<double>();
  double* part_b = part_t + P * chunks * kFinVals;
  double* totals = part_b + P * chunks * kFinVals;
  auto* pr = reinterpret_cast<PlaneResult*>(totals + P * kFinVals);
  double* w_blob = totals + P * kFinVals + P * pr_doubles;
  double* w_global = w_blob + P;
  const double* st = stats.data_ptr<double>();
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid{unsigned(chunks), unsigned(P)};
  const unsigned plane_blocks = unsigned(ceil_div(P, 128));
  chunk_totals_kernel<CE><<<grid, kFinThreads, 0, stream>>>(st, K, chunks, part_t);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  plane_totals_kernel<<<plane_blocks, 128, 0, stream>>>(part_t, P, chunks, totals);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  chunk_blob_kernel<CE><<<grid, kFinThreads, 0, stream>>>(st, C, K, chunks, prm, totals, part_b);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  plane_result_kernel<CE><<<plane_blocks, 128, 0, stream>>>(st, P, K, chunks, prm, totals, part_b,
                                                            pr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  combine_planes_kernel<<<1, 1, 0, stream>>>(pr, B, C, prm, invalid.data_ptr<int>(), w_blob,
                                             w_global, loss.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  label_coef_kernel<CE><<<unsigned(ceil_div(P * K, 256)), 256, 0, stream>>>(
      st, pr, w_blob, w_global, invalid.data_ptr<int>(), P, K, prm, coef.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- fused Dice+CE: accumulate --------------------------------------------------------------

// Where a warp's flushes of the five sums go (as WarpTable, accumulate_common.cuh).
template <typename acc_t>
struct WarpTableCE {
  acc_t* rows;
  double* stats;
  bool atomics;
  __device__ __forceinline__ void add(int64_t key, const acc_t (&v)[kNumStatsCE]) const {
    if (atomics) {
#pragma unroll
      for (int i = 0; i < kNumStatsCE; ++i) atomicAdd(stats + key * kNumStatsCE + i, double(v[i]));
    } else {
      acc_t* e = rows + key * kNumStatsCE;
#pragma unroll
      for (int i = 0; i < kNumStatsCE; ++i) e[i] += v[i];
    }
  }
};

// warp_flush with five sums: the lanes flushing the same key are summed with the fixed xor
// butterfly, their lowest lane writes. All lanes must call it.
template <typename acc_t>
__device__ __forceinline__ void warp_flush_ce(bool pred, int64_t key, const acc_t (&v)[kNumStatsCE],
                                              const WarpTableCE<acc_t>& table) {
  const int lane = threadIdx.x & 31;
  unsigned pending = __ballot_sync(kFull, pred);
  while (pending) {
    const int leader = __ffs(pending) - 1;
    const int64_t group = __shfl_sync(kFull, key, leader);
    const bool in = pred && key == group;
    acc_t g[kNumStatsCE];
#pragma unroll
    for (int i = 0; i < kNumStatsCE; ++i) g[i] = warp_sum<acc_t>(in ? v[i] : acc_t(0));
    if (lane == leader) table.add(group, g);
    __syncwarp();
    pending &= ~__ballot_sync(kFull, in);
  }
}

// A lane's current run of equal keys, five sums (v[2] is the count).
template <typename acc_t>
struct RunCE {
  int64_t key = -1;
  acc_t v[kNumStatsCE] = {0, 0, 0, 0, 0};

  __device__ __forceinline__ void push(bool valid, int64_t k, const acc_t (&add)[kNumStatsCE],
                                       const WarpTableCE<acc_t>& table) {
    const bool change = valid && k != key;
    warp_flush_ce<acc_t>(change && v[2] > acc_t(0), key, v, table);
    if (change) {
      key = k;
#pragma unroll
      for (int i = 0; i < kNumStatsCE; ++i) v[i] = acc_t(0);
    }
    if (valid) {
#pragma unroll
      for (int i = 0; i < kNumStatsCE; ++i) v[i] += add[i];
    }
  }

  __device__ __forceinline__ void close(const WarpTableCE<acc_t>& table) {
    warp_flush_ce<acc_t>(v[2] > acc_t(0), key, v, table);
  }
};

// Sigmoid / none. Grid (blocks per plane, planes of this launch). The accumulate kernel of
// blob_loss_kernel.cu with the two BCE sums: g_logits / b_logits say whether the global / blob
// form is BCE with logits (else on probabilities), as global_ce_on_logits / blob_ce_on_logits.
template <typename scalar_t, typename label_t, bool SHARED>
__global__ void __launch_bounds__(kThreads)
    accumulate_ce_kernel(const scalar_t* __restrict__ x, const label_t* __restrict__ labels,
                         int64_t V, int64_t K, int32_t act, bool squared, bool g_logits,
                         bool b_logits, TableArgs ta, int* invalid) {
  using acc_t = typename AccType<scalar_t>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const int64_t plane = blockIdx.y;
  const int lane = threadIdx.x & 31;
  const WarpTable<acc_t> opened = open_tables<acc_t, SHARED>(smem, ta, plane);
  const WarpTableCE<acc_t> table{opened.rows, opened.stats, opened.atomics};
  const scalar_t* xp = x + plane * V;
  const label_t* lp = labels + plane * V;
  const int64_t warp_in_plane = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t stride = int64_t(gridDim.x) * kWarps * kTile;

  RunCE<acc_t> run;
  acc_t bg[kNumStatsCE] = {0, 0, 0, 0, 0};  // bg[2] unused: the count is bg_n
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
      acc_t add[kNumStatsCE] = {0, 0, 1, 0, 0};
      if (valid) {
        const acc_t xa = acc_t(xv[j]);
        const acc_t p = activate<acc_t>(xa, act);
        const bool t = k != 0;
        const acc_t eg = g_logits ? bce_logits<acc_t>(xa, t) : bce_prob<acc_t>(p, t);
        add[0] = p;
        add[1] = squared ? p * p : p;
        add[3] = eg;
        add[4] = b_logits == g_logits ? eg
                                      : (b_logits ? bce_logits<acc_t>(xa, t) : bce_prob<acc_t>(p, t));
      }
      const bool background = valid && k == 0;
      if (background) {  // in registers: never a flush, never an atomic
        bg[0] += add[0];
        bg[1] += add[1];
        bg[3] += add[3];
        bg[4] += add[4];
        ++bg_n;
      }
      run.push(valid && !background, k, add, table);
    }
  }
  run.close(table);
  acc_t sums[kNumStatsCE];
#pragma unroll
  for (int i = 0; i < kNumStatsCE; ++i) sums[i] = warp_sum<acc_t>(i == 2 ? acc_t(bg_n) : bg[i]);
  if (lane == 0 && sums[2] > acc_t(0)) table.add(0, sums);
  if (bad) atomicExch(invalid, 1);
  close_tables<acc_t, SHARED>(smem, ta, plane);
}

// Sums the partial rows of each plane in row order (as blob_loss_kernel.cu's reduce_rows_kernel).
template <typename acc_t>
__global__ void reduce_rows_ce_kernel(const acc_t* __restrict__ partial, int64_t planes,
                                      int64_t rows, int64_t entries, double* __restrict__ stats) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= planes * entries) return;
  const int64_t plane = i / entries, e = i % entries;
  const acc_t* src = partial + plane * rows * entries + e;
  double v = 0.0;
  for (int64_t r = 0; r < rows; ++r) v += double(src[r * entries]);
  stats[i] = v;
}

#define BLOB_CE_DISPATCH_TYPES(INPUT, LABELS, ...)                                       \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, INPUT, "blob_cuda_ce", [&] { \
    using in_t = scalar_t;                                                               \
    AT_DISPATCH_V2(LABELS, "blob_cuda_ce_labels", AT_WRAP([&] {                          \
                     using lab_t = scalar_t;                                             \
                     __VA_ARGS__();                                                      \
                   }),                                                                   \
                   at::kByte, at::kShort, at::kInt, at::kLong);                          \
  })

template <typename Kernel>
int blocks_per_sm_ce(Kernel kernel, size_t smem) {
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  }
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, smem));
  return std::max(n, 1);
}

// launch_accumulate of blob_loss_kernel.cu for the five sums (sigmoid / none only).
template <typename in_t, typename lab_t, bool SHARED>
void launch_accumulate_ce(const at::Tensor& input, const at::Tensor& labels, const LossParams& prm,
                          int64_t K, at::Tensor& stats, const at::Tensor& invalid, size_t smem,
                          bool atomics) {
  using acc_t = typename AccType<in_t>::type;
  const int64_t B = input.size(0), C = input.size(1), V = input.size(2);
  const int64_t planes = B * C;
  const int64_t entries = K * kNumStatsCE;
  const int per_sm = blocks_per_sm_ce(accumulate_ce_kernel<in_t, lab_t, SHARED>, SHARED ? smem : 0);
  const int64_t target = int64_t(per_sm) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t max_blocks = std::max<int64_t>(1, ceil_div(V, int64_t(kTile) * kWarps));
  int64_t blocks = std::min(max_blocks, std::max<int64_t>(1, ceil_div(target, planes)));
  int64_t chunk = planes;
  at::Tensor partial;
  const auto acc_dtype = std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;
  if (SHARED) {
    partial = at::empty({planes * blocks * entries}, input.options().dtype(acc_dtype));
  } else if (!atomics) {
    const WarpRowPlan plan = plan_warp_rows(planes, entries * int64_t(sizeof(acc_t)), kWarps,
                                            blocks, warp_rows_budget());
    blocks = plan.blocks;
    chunk = plan.planes_per_launch;
    partial = at::zeros({chunk * blocks * kWarps * entries}, input.options().dtype(acc_dtype));
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t p0 = 0; p0 < planes; p0 += chunk) {
    const int64_t n = std::min(chunk, planes - p0);
    if (p0 > 0) partial.zero_();
    TableArgs ta{partial.defined() ? partial.data_ptr() : nullptr,
                 stats.data_ptr<double>() + p0 * entries, entries, atomics};
    const dim3 grid{static_cast<unsigned>(blocks), static_cast<unsigned>(n)};
    accumulate_ce_kernel<in_t, lab_t, SHARED><<<grid, kThreads, SHARED ? smem : 0, stream>>>(
        input.data_ptr<in_t>() + p0 * V, labels.data_ptr<lab_t>() + p0 * V, V, K, prm.activation,
        uses_pow(prm), global_ce_on_logits(prm), blob_ce_on_logits(prm), ta,
        invalid.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (partial.defined()) {
      const int64_t rows = SHARED ? blocks : blocks * kWarps;
      reduce_rows_ce_kernel<acc_t><<<unsigned(ceil_div(n * entries, 256)), 256, 0, stream>>>(
          static_cast<const acc_t*>(partial.data_ptr()), n, rows, entries,
          stats.data_ptr<double>() + p0 * entries);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

// ---- fused Dice+CE: backward ----------------------------------------------------------------

constexpr int64_t kCoefSmemBytesCE = 48 * 1024;

// Sigmoid / none. Grid (blocks per plane, B * C). grad = grad_out * ((a + b dpow(p) +
// d dBCE/dp) act'(x) + c (p - y)), y = [l > 0]: the CPU's voxel_grad<true>.
template <typename scalar_t, typename label_t>
__global__ void __launch_bounds__(kThreads)
    backward_ce_kernel(const double* __restrict__ grad_out, const scalar_t* __restrict__ x,
                       const label_t* __restrict__ labels, const double* __restrict__ coef,
                       int64_t V, int64_t K, int32_t act, bool squared, bool staged,
                       scalar_t* __restrict__ grad_x) {
  using acc_t = typename AccType<scalar_t>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* cs = reinterpret_cast<acc_t*>(smem_raw);
  const int64_t plane = blockIdx.y;
  const double* cp = coef + plane * K * kNumCoefCE;
  if (staged) {
    for (int64_t i = threadIdx.x; i < K * kNumCoefCE; i += blockDim.x) cs[i] = acc_t(cp[i]);
  }
  __syncthreads();
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
        acc_t e[kNumCoefCE] = {NAN, NAN, NAN, NAN};
        if (label_ok(k, K)) {
#pragma unroll
          for (int c = 0; c < kNumCoefCE; ++c)
            e[c] = staged ? cs[k * kNumCoefCE + c] : acc_t(cp[k * kNumCoefCE + c]);
        }
        const acc_t p = activate<acc_t>(acc_t(xv[j]), act);
        const bool t = k != 0;
        const acc_t g =
            (grad_wrt_p(p, e[0], e[1], squared) + e[3] * bce_prob_grad(p, t)) *
                elementwise_act_grad(p, act) +
            e[2] * (p - (t ? acc_t(1) : acc_t(0)));
        gp[i] = scalar_t(go * g);
      }
    }
  }
}

}  // namespace

void finalize_cuda_parallel(const at::Tensor& stats, const at::Tensor& invalid,
                            const LossParams& prm, at::Tensor& loss_out, at::Tensor& coef) {
  const c10::cuda::CUDAGuard guard(stats.device());
  TORCH_CHECK(stats.size(3) == num_stats(prm) && coef.size(3) == num_coef(prm),
              "finalize_cuda_parallel: tables of the wrong width");
  at::Tensor loss =
      loss_out.scalar_type() == at::kDouble ? loss_out : at::empty({}, stats.options());
  if (prm.with_ce) {
    launch_finalize<true>(stats, invalid, prm, loss, coef);
  } else {
    launch_finalize<false>(stats, invalid, prm, loss, coef);
  }
  if (!loss.is_same(loss_out)) loss_out.copy_(loss);
}

bool accumulate_cuda_ce(const at::Tensor& input, const at::Tensor& labels, const LossParams& prm,
                        int64_t K, at::Tensor& stats, const at::Tensor& invalid) {
  const c10::cuda::CUDAGuard guard(input.device());
  TORCH_CHECK(prm.with_ce && prm.activation != kSoftmax && stats.size(3) == kNumStatsCE,
              "accumulate_cuda_ce: Dice+CE with sigmoid or none only");
  const size_t acc_size = input.scalar_type() == at::kDouble ? 8 : 4;
  const size_t smem = kWarps * size_t(K) * kNumStatsCE * acc_size;
  const size_t smem_max = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  const bool shared = smem <= smem_max;
  const bool atomics = !shared && !at::globalContext().deterministicAlgorithms();
  if (atomics) stats.zero_();
  BLOB_CE_DISPATCH_TYPES(input.scalar_type(), labels.scalar_type(), [&] {
    if (shared) {
      launch_accumulate_ce<in_t, lab_t, true>(input, labels, prm, K, stats, invalid, smem, false);
    } else {
      launch_accumulate_ce<in_t, lab_t, false>(input, labels, prm, K, stats, invalid, 0, atomics);
    }
  });
  return true;
}

bool backward_cuda_ce(const at::Tensor& grad_out, const at::Tensor& input,
                      const at::Tensor& labels, const at::Tensor& coef, const LossParams& prm,
                      at::Tensor& grad_input) {
  const c10::cuda::CUDAGuard guard(input.device());
  TORCH_CHECK(prm.with_ce && prm.activation != kSoftmax && coef.size(3) == kNumCoefCE,
              "backward_cuda_ce: Dice+CE with sigmoid or none only");
  const int64_t B = input.size(0), C = input.size(1), V = input.size(2), K = coef.size(2);
  const int64_t planes = B * C;
  const size_t acc_size = input.scalar_type() == at::kDouble ? 8 : 4;
  const size_t smem_needed = size_t(K) * kNumCoefCE * acc_size;
  const bool staged = smem_needed <= size_t(kCoefSmemBytesCE);
  const size_t smem = staged ? smem_needed : 0;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  auto stream = at::cuda::getCurrentCUDAStream();
  auto go = grad_out.reshape({}).to(input.device(), at::kDouble);
  BLOB_CE_DISPATCH_TYPES(input.scalar_type(), labels.scalar_type(), [&] {
    const int64_t per_block = int64_t(kThreads) * kItems;
    const int64_t blocks = std::min(ceil_div(V, per_block),
                                    std::max<int64_t>(1, ceil_div(int64_t(sms) * 8, planes)));
    backward_ce_kernel<in_t, lab_t>
        <<<dim3(unsigned(blocks), unsigned(planes)), kThreads, smem, stream>>>(
            go.data_ptr<double>(), input.data_ptr<in_t>(), labels.data_ptr<lab_t>(),
            coef.data_ptr<double>(), V, K, prm.activation, prm.squared_pred, staged,
            grad_input.data_ptr<in_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return true;
}

}  // namespace blob
