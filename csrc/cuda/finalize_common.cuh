// Device-side pieces of the CUDA finalisation shared by the .cu files of csrc/cuda/ (the default
// kernels in blob_loss_kernel.cu and the opt-in forward in forward_fast.cu): the fixed-order
// block reduction, one plane's summary and one label's coefficients, with the formulas of
// blob_loss_math.h. Header-only, internal linkage.
#pragma once

#include <cstdint>

#include "../blob_ops.h"

namespace blob {
namespace {

constexpr int kReduceThreads = 256;

// Fixed-order block reduction of N doubles per thread; the result is in vals of thread 0.
template <int N>
__device__ void block_reduce(double (&vals)[N], double (*buf)[N]) {
  for (int i = 0; i < N; ++i) buf[threadIdx.x][i] = vals[i];
  __syncthreads();
  for (int half = kReduceThreads / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half)
      for (int i = 0; i < N; ++i) buf[threadIdx.x][i] += buf[threadIdx.x + half][i];
    __syncthreads();
  }
  for (int i = 0; i < N; ++i) vals[i] = buf[0][i];
  __syncthreads();
}

// The summary of one plane by one block of kReduceThreads threads (thread 0 writes *out).
__device__ __forceinline__ void plane_summary(const double* __restrict__ stats, int64_t plane,
                                              int64_t C, int64_t K, const LossParams& prm,
                                              double (*buf)[4], PlaneResult* __restrict__ out) {
  const double* st = stats + plane * K * kNumStats;
  PlaneTotals t{0, 0, 0, 0};
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) add_to_totals(t, k, st + k * kNumStats);
  double tv[4] = {t.s_all, t.p_all, t.s_fg, t.n_fg};
  block_reduce<4>(tv, buf);
  t = PlaneTotals{tv[0], tv[1], tv[2], tv[3]};
  PlaneBlob pb{0, 0, 0, 0};
  const bool has_blob_term = !(prm.activation == kSoftmax && plane % C == 0);
  if (has_blob_term) {
    for (int64_t k = 1 + threadIdx.x; k < K; k += blockDim.x)
      if (st[k * kNumStats + 2] > 0.0) add_blob(pb, blob_term(t, st, st + k * kNumStats, prm));
  }
  double bv[4] = {pb.loss_sum, pb.count, pb.bg_lin, pb.bg_pow};
  block_reduce<4>(bv, buf);
  if (threadIdx.x == 0) {
    PlaneResult r;
    r.totals = t;
    r.global_loss = global_term(t, st, prm).loss;
    r.blob = PlaneBlob{bv[0], bv[1], bv[2], bv[3]};
    out[plane] = r;
  }
}

// The coefficients of entry i = plane * K + k of the table.
__device__ __forceinline__ void label_coef_entry(int64_t i, const double* __restrict__ stats,
                                                 const PlaneResult* __restrict__ pr,
                                                 const double* __restrict__ w_blob,
                                                 const double* __restrict__ w_global,
                                                 const int* __restrict__ invalid, int64_t K,
                                                 const LossParams& prm, double* __restrict__ coef) {
  const int64_t plane = i / K, k = i % K;
  const double* st = stats + plane * K * kNumStats;
  label_coef(k, st, st + k * kNumStats, pr[plane].totals, pr[plane].blob, *w_global, w_blob[plane],
             prm, coef + i * kNumCoef);
  if (*invalid) coef[i * kNumCoef] = coef[i * kNumCoef + 1] = NAN;
}

}  // namespace
}  // namespace blob
