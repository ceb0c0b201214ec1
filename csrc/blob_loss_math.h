// Closed-form blob loss math, shared by the CPU and the CUDA kernels.
//
// The accumulation kernels reduce every (b, c) plane to per-label sufficient statistics:
//   S_k = sum of p over voxels with label k, P_k = sum of p^q (q = 2 with squared_pred, else
//   P_k = S_k) and N_k = number of voxels with label k.
// Every loss term of blob loss is a closed form of those sums (docs/design.md, section 3), so this
// header turns a table of statistics into the loss and into a per-label coefficient table
// (a_k, b_k) such that dL/dp_i = a[l_i] + b[l_i] * q * p_i^(q-1). The backward kernels then
// need a single pass: grad_x_i = grad_out * (a[l_i] + b[l_i] * dpow(p_i)) * act'(x_i).
//
// A "region term" is a Dice or Tversky loss of p against a binary target T over a domain:
//   global term of (b, c):  T = {l > 0},  domain = every voxel;
//   blob term of label k:   T = {l = k},  domain = {l = 0} u {l = k}  (paper Eq. 1).
// In "official" masking the voxels of the other instances are not dropped but enter as logit 0
// (p = 0.5) with target 0: a constant extra prediction mass `masked` with no gradient.
//
// Everything is __host__ __device__ and works in double: the tables are O(B*C*K), tiny next to
// the O(V) passes, and double keeps the float64 path exact to rounding.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define BLOB_HD __host__ __device__ __forceinline__
#else
#define BLOB_HD inline
#endif

namespace blob {

enum Activation : int32_t { kSigmoid = 0, kSoftmax = 1, kNoActivation = 2 };
enum Masking : int32_t { kPaper = 0, kOfficial = 1 };
enum LossKind : int32_t { kDice = 0, kTversky = 1 };

// Statistics stored per label: sum p, sum p^q, count.
constexpr int kNumStats = 3;
// Coefficients stored per label: a (multiplies 1) and b (multiplies dpow(p) = q p^(q-1)).
constexpr int kNumCoef = 2;
// Blob Dice+CE adds two statistics per label, the sums of the voxels' binary cross-entropy
// against their own target [l > 0] in the two forms torch computes it (bce_logits, bce_prob
// below): column 3 in the form of the global term, column 4 in the form of the blob terms;
// and two coefficients: c multiplies (p - y) (BCE with logits), d multiplies torch's
// dBCE/dp = (p - y) / max(p (1 - p), eps) (BCE on probabilities), times act'(x).
constexpr int kNumStatsCE = 5;
constexpr int kNumCoefCE = 4;

struct LossParams {
  int32_t kind;        // LossKind
  int32_t activation;  // Activation
  int32_t masking;     // Masking
  bool squared_pred;   // Dice only: p^2 in the denominator
  double smooth_nr;
  double smooth_dr;
  double tversky_fp;  // Tversky weight of false positives (paper: 0.3)
  double tversky_fn;  // Tversky weight of false negatives (paper: 0.7)
  double alpha;       // weight of the global term (paper Eq. 2)
  double beta;        // weight of the blob term (paper Eq. 2)
  // Blob Dice+CE (kind == kDice only): every term is lambda_dice * Dice + lambda_ce * BCE, the
  // BCE a mean over the plane's voxels (inv_voxels = 1 / V). with_ce == false: plain Dice or
  // Tversky (lambda_dice = 1, lambda_ce = 0).
  bool with_ce;
  double lambda_dice;
  double lambda_ce;
  double inv_voxels;
};

BLOB_HD int num_stats(const LossParams& prm) { return prm.with_ce ? kNumStatsCE : kNumStats; }
BLOB_HD int num_coef(const LossParams& prm) { return prm.with_ce ? kNumCoefCE : kNumCoef; }

// ---- binary cross-entropy of one voxel against its target y = [l > 0] ----------------------
// As torch computes them: BCEWithLogitsLoss (softplus of -x or x), and binary_cross_entropy on a
// probability with its logs clamped at -100 and its gradient (p - y) / max(p (1 - p), 1e-12f).
// The global term of a sigmoid output and the blob terms of official masking (the published
// code applies MONAI's DiceCELoss(sigmoid=True), i.e. BCE with logits, to masked logits) use
// the first; "none" (probabilities) and the blob terms of paper masking (the criterion on the
// masked probabilities p * mask) the second.
template <typename T>
BLOB_HD T bce_logits(T x, bool target) {
  const T z = target ? -x : x;
  return (z > T(0) ? z : T(0)) + log1p(exp(-fabs(x)));
}

template <typename T>
BLOB_HD T bce_prob(T p, bool target) {
  const T l = target ? log(p) : log1p(-p);
  return l > T(-100) || l != l ? -l : T(100);  // a p outside [0, 1] gives NaN, not the clamp
}

template <typename T>
BLOB_HD T bce_prob_grad(T p, bool target) {
  const T d = p * (T(1) - p);
  const T eps = static_cast<T>(1e-12f);
  return (p - (target ? T(1) : T(0))) / (d > eps ? d : eps);
}

// Whether the global term's BCE is the logit form (sigmoid) and whether the blob terms' is.
BLOB_HD bool global_ce_on_logits(const LossParams& prm) { return prm.activation == kSigmoid; }
BLOB_HD bool blob_ce_on_logits(const LossParams& prm) {
  return prm.activation == kSigmoid && prm.masking == kOfficial;
}

// Loss value and partial derivatives of one region term.
struct RegionTerm {
  double loss;
  double d_target;     // dL/dp for a voxel of the target (linear part)
  double d_nontarget;  // dL/dp for a non-target voxel of the domain (linear part)
  double d_pow;        // dL/d(sum p^q), for every voxel of the domain
};

// s_t: sum p over the target; n_t: target size; p_dom: sum p^q over the domain;
// s_nont: sum p over the non-target part of the domain; masked: extra prediction mass of
// masked voxels (official mode), already raised to the power q where that applies.
BLOB_HD RegionTerm region_term(double s_t, double n_t, double p_dom, double s_nont, double masked,
                               const LossParams& prm) {
  RegionTerm r;
  if (prm.kind == kDice) {
    // L = 1 - (2 s_t + nr) / (p_dom + masked + n_t + dr)    (MONAI DiceLoss, batch=False)
    const double num = 2.0 * s_t + prm.smooth_nr;
    const double den = p_dom + masked + n_t + prm.smooth_dr;
    r.loss = 1.0 - num / den;
    r.d_target = -2.0 / den;
    r.d_nontarget = 0.0;
    r.d_pow = num / (den * den);
  } else {
    // tp = s_t, fp = s_nont + masked, fn = n_t - s_t   (MONAI TverskyLoss)
    // L = 1 - (tp + nr) / (tp + wfp * fp + wfn * fn + dr)
    const double num = s_t + prm.smooth_nr;
    const double den =
        s_t + prm.tversky_fp * (s_nont + masked) + prm.tversky_fn * (n_t - s_t) + prm.smooth_dr;
    r.loss = 1.0 - num / den;
    r.d_target = -(den - num * (1.0 - prm.tversky_fn)) / (den * den);
    r.d_nontarget = num * prm.tversky_fp / (den * den);
    r.d_pow = 0.0;
  }
  return r;
}

BLOB_HD bool uses_pow(const LossParams& prm) { return prm.kind == kDice && prm.squared_pred; }

// Prediction mass a masked voxel adds in official mode: logit 0 -> p = 0.5 (0.25 squared).
BLOB_HD double masked_mass(const LossParams& prm) {
  if (prm.masking != kOfficial || prm.activation != kSigmoid) return 0.0;
  return uses_pow(prm) ? 0.25 : 0.5;
}

// Per-(b, c) totals needed by every term of that plane.
struct PlaneTotals {
  double s_all;  // sum p over the plane
  double p_all;  // sum p^q over the plane
  double s_fg;   // sum p over labels > 0
  double n_fg;   // number of voxels with label > 0 (G in docs/design.md)
};

BLOB_HD void add_to_totals(PlaneTotals& t, int64_t k, const double* st) {
  t.s_all += st[0];
  t.p_all += st[1];
  if (k > 0) {
    t.s_fg += st[0];
    t.n_fg += st[2];
  }
}

BLOB_HD RegionTerm global_term(const PlaneTotals& t, const double* st0, const LossParams& prm) {
  return region_term(t.s_fg, t.n_fg, t.p_all, st0[0], 0.0, prm);
}

// Blob term of label k > 0 with N_k > 0; st0 and stk are the statistics of labels 0 and k.
BLOB_HD RegionTerm blob_term(const PlaneTotals& t, const double* st0, const double* stk,
                             const LossParams& prm) {
  const double masked = masked_mass(prm) * (t.n_fg - stk[2]);
  return region_term(stk[0], stk[2], st0[1] + stk[1], st0[0], masked, prm);
}

// Dice+CE: the BCE part of the global term of a plane (mean over its V voxels) and of the blob
// term of label k. Under official masking the other instances' voxels enter as logit 0 with
// target 0, log 2 each; under paper masking as probability 0 with target 0, which adds 0.
BLOB_HD double global_ce(double ce_sum, const LossParams& prm) { return ce_sum * prm.inv_voxels; }
BLOB_HD double blob_ce(const PlaneTotals& t, const double* st0, const double* stk,
                       const LossParams& prm) {
  const double masked = blob_ce_on_logits(prm) ? 0.6931471805599453 * (t.n_fg - stk[2]) : 0.0;
  return (st0[4] + stk[4] + masked) * prm.inv_voxels;
}

// Per-(b, c) summary of the blob term: sum of instance losses, instance count, and the sums
// over instances of the derivatives a background voxel receives.
struct PlaneBlob {
  double loss_sum;
  double count;
  double bg_lin;  // sum_k dL_k/dp (linear part) of a background voxel
  double bg_pow;  // sum_k dL_k/d(sum p^q)
};

BLOB_HD void add_blob(PlaneBlob& pb, const RegionTerm& r) {
  pb.loss_sum += r.loss;
  pb.count += 1.0;
  pb.bg_lin += r.d_nontarget;
  pb.bg_pow += r.d_pow;
}

// Coefficients (a, b) of label k of a plane. w_global: weight of this plane's global term in the
// total loss; w_blob: weight of each instance term of this plane (0 if the plane has no blob
// term). `blob` must hold this plane's PlaneBlob when w_blob != 0.
BLOB_HD void label_coef(int64_t k, const double* st0, const double* stk, const PlaneTotals& t,
                        const PlaneBlob& blob, double w_global, double w_blob,
                        const LossParams& prm, double* coef) {
  const RegionTerm g = global_term(t, st0, prm);
  double a = w_global * (k > 0 ? g.d_target : g.d_nontarget);
  double b = w_global * g.d_pow;
  if (w_blob != 0.0) {
    if (k == 0) {
      a += w_blob * blob.bg_lin;
      b += w_blob * blob.bg_pow;
    } else if (stk[2] > 0.0) {
      const RegionTerm r = blob_term(t, st0, stk, prm);
      a += w_blob * r.d_target;
      b += w_blob * r.d_pow;
    }
  }
  coef[0] = a;
  coef[1] = b;
}

// Dice+CE: coefficients (c, d) of label k's BCE gradient (see kNumCoefCE). w_global and w_blob
// as for label_coef, without lambda_ce; n_inst: the plane's number of instance terms. The
// global term reaches every voxel as its own target; the blob terms reach a voxel of instance k
// through L_k only (it is masked in the others, without gradient) and a background voxel
// through every L_k of its channel.
BLOB_HD void label_ce_coef(int64_t k, const double* stk, double n_inst, double w_global,
                           double w_blob, const LossParams& prm, double* coef) {
  const double scale = prm.lambda_ce * prm.inv_voxels;
  double blob = 0.0;
  if (w_blob != 0.0) blob = k == 0 ? w_blob * n_inst : (stk[2] > 0.0 ? w_blob : 0.0);
  const double g = w_global * scale, bl = blob * scale;
  coef[0] = (global_ce_on_logits(prm) ? g : 0.0) + (blob_ce_on_logits(prm) ? bl : 0.0);
  coef[1] = (global_ce_on_logits(prm) ? 0.0 : g) + (blob_ce_on_logits(prm) ? 0.0 : bl);
}

// ---- combining the planes (paper Eq. 2 and 3) ------------------------------------------------

// What the finalisation knows of one (b, c) plane after its pass over the label table.
struct PlaneResult {
  double global_loss;
  PlaneTotals totals;
  PlaneBlob blob;  // count == 0 when the plane has no instance or no blob term
};

// Turns the plane results into the total loss and the weight of each instance term of each
// plane (w_blob[b * C + c]; 0 for planes without instances). Serial: B * C is small. Reduction:
// mean over the instances of a plane, over the planes of a batch element that have instances,
// over the batch elements that have instances (0 if none); the global term is the mean over
// all (b, c). Total = alpha * global + beta * blob.
BLOB_HD double combine_planes(const PlaneResult* pr, int64_t B, int64_t C, const LossParams& prm,
                              double* w_blob, double* w_global) {
  double global_sum = 0.0, blob_sum = 0.0;
  int64_t batches_with = 0;
  for (int64_t b = 0; b < B; ++b) {
    int64_t planes_with = 0;
    double sum_b = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      const PlaneResult& r = pr[b * C + c];
      global_sum += r.global_loss;
      if (r.blob.count > 0.0) {
        ++planes_with;
        sum_b += r.blob.loss_sum / r.blob.count;
      }
    }
    if (planes_with > 0) {
      ++batches_with;
      blob_sum += sum_b / double(planes_with);
    }
  }
  *w_global = prm.alpha / double(B * C);
  for (int64_t b = 0; b < B; ++b) {
    int64_t planes_with = 0;
    for (int64_t c = 0; c < C; ++c) planes_with += pr[b * C + c].blob.count > 0.0 ? 1 : 0;
    for (int64_t c = 0; c < C; ++c) {
      const double cnt = pr[b * C + c].blob.count;
      w_blob[b * C + c] =
          cnt > 0.0 ? prm.beta / (double(batches_with) * double(planes_with) * cnt) : 0.0;
    }
  }
  const double blob_loss = batches_with > 0 ? blob_sum / double(batches_with) : 0.0;
  return *w_global * global_sum + prm.beta * blob_loss;
}

// ---- activations --------------------------------------------------------------------------

template <typename T>
BLOB_HD T sigmoid_of(T x) {
  return T(1) / (T(1) + exp(-x));
}

// dL/dp -> dL/dx for the elementwise activations (softmax is handled by the kernels).
template <typename T>
BLOB_HD T elementwise_act_grad(T p, int32_t activation) {
  return activation == kSigmoid ? p * (T(1) - p) : T(1);
}

// dL/dp from the coefficient pair of the voxel's label.
template <typename T>
BLOB_HD T grad_wrt_p(T p, T a, T b, bool squared) {
  return squared ? a + b * (T(2) * p) : a + b;
}

}  // namespace blob
