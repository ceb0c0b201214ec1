// Schemas, checks and drivers of the component-wise (Voronoi) losses (cc_ops.h; issue 20).
//
// Public operators: blob::cc_dice, blob::cc_dice_ce (the total alpha * global + beta * cc, a 0-dim
// tensor; C++ autograd in autograd/cc_autograd.cpp). Private: blob::_cc_dice_forward /
// blob::_cc_dice_ce_forward return (loss, coef, label_ids), blob::_cc_dice_backward /
// blob::_cc_dice_ce_backward are the one-pass backward; the fake kernels and the autograd of the
// private forward ops (torch.compile) are in blobbench/_ops.py.
//
// The label range of the tables is that of `regions` (the table index), found by the blob ops'
// machinery (common/glue.h: dense, caller bound, sized by the ids present, or compacted). The
// region map is checked as it is read: region ids in range, every instance voxel's region is its
// own id (the CPU kernel compares them in the accumulate pass; after a compaction, whose indices
// are no longer ids, an ATen comparison does), and every region present in a plane with
// instances holds instance voxels (from the table, in the finalisation). The CPU raises naming
// the argument; the composite (CUDA) makes the loss and the gradient NaN, without a sync.
#include "cc_ops.h"

#include <ATen/Parallel.h>

#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

namespace blob {
namespace cc {

using namespace detail;

LossParams make_cc_params(double alpha, double beta, const std::string& activation,
                          bool squared_pred, double smooth_nr, double smooth_dr, bool with_ce,
                          double lambda_dice, double lambda_ce, const char* op) {
  LossParams p = make_params(kDice, alpha, beta, activation, "paper", squared_pred, smooth_nr,
                             smooth_dr, 0.0, 0.0, op);
  // bce_block (cpu/kernels_impl.h) then computes the global term's form only, copied to the
  // blob form: with logits for sigmoid, on probabilities for "none".
  p.masking = p.activation == kSigmoid ? kOfficial : kPaper;
  p.with_ce = with_ce;
  p.lambda_dice = with_ce ? lambda_dice : 1.0;
  p.lambda_ce = with_ce ? lambda_ce : 0.0;
  return p;
}

void check_regions(const at::Tensor& regions, const at::Tensor& instances, const char* op) {
  TORCH_CHECK_VALUE(regions.sizes() == instances.sizes(), op,
                    ": `regions` must have the shape of `instances` (B, C, *spatial), got regions ",
                    shape(regions.sizes()), " and instances ", shape(instances.sizes()));
  TORCH_CHECK_TYPE(regions.scalar_type() == instances.scalar_type(), op,
                   ": `regions` must have the dtype of `instances`, got regions ",
                   regions.scalar_type(), " and instances ", instances.scalar_type());
  TORCH_CHECK_VALUE(regions.device() == instances.device(), op,
                    ": `regions` and `instances` must be on the same device, got regions on ",
                    regions.device().str(), " and instances on ", instances.device().str());
}

namespace {

bool use_composite() {
  const char* env = std::getenv("BLOBBENCH_CC");
  return env != nullptr && std::string(env) == "composite";
}

// Where the accumulate pass failed (CPU): says what is wrong with the ids, and raises.
[[noreturn]] void raise_bad_ids(const at::Tensor& instances, const at::Tensor& regions,
                                int64_t max_label, int32_t activation, const char* op) {
  const auto [rlo, rhi] = id_range(regions, activation);
  check_id_range(rlo, rhi, max_label, op, "regions");
  const auto [ilo, ihi] = id_range(instances, activation);
  check_id_range(ilo, ihi, -1, op, "instances");
  (void)ihi;
  (void)rhi;
  const at::Tensor inst = read_labels(instances, activation);
  const at::Tensor reg = read_labels(regions, activation);
  const at::Tensor bad = inst.ne(0).logical_and(inst.ne(reg));
  if (bad.any().item<bool>()) {
    const int64_t flat = bad.reshape({-1}).nonzero().select(1, 0)[0].item<int64_t>();
    std::vector<int64_t> pos(bad.dim());
    int64_t rest = flat;
    for (int64_t d = bad.dim() - 1; d >= 0; --d) {
      pos[d] = rest % bad.size(d);
      rest /= bad.size(d);
    }
    if (activation == kSoftmax) pos[1] += 1;  // read_labels leaves out channel 0
    std::string where = "(";
    for (size_t d = 0; d < pos.size(); ++d) where += (d ? ", " : "") + num(pos[d]);
    where += ")";
    const int64_t iv = inst.reshape({-1})[flat].item<int64_t>();
    const int64_t rv = reg.reshape({-1})[flat].item<int64_t>();
    TORCH_CHECK_VALUE(false, op,
                      ": `regions` must give every instance voxel its own id (an instance voxel "
                      "is its own nearest instance), found instances = ",
                      num(iv), " but regions = ", num(rv), " at ", where,
                      "; compute the regions with blobbench.voronoi_regions(instances)");
  }
  TORCH_CHECK(false, op, ": internal error: the accumulate pass failed on valid ids");
}

// A region present in a plane with instances must hold instance voxels (of its own id, which the
// id check guarantees); region 0 is allowed only in planes without instances.
[[noreturn]] void raise_bad_region(int64_t plane, int64_t k, int64_t C, const LabelRange& range,
                                   const char* op) {
  const int64_t b = plane / C, c = plane % C;
  const int64_t id = range.label_ids.size(2) > 0
                         ? range.label_ids.select(0, b).select(0, c)[k].item<int64_t>()
                         : k;
  const std::string at_plane = " in plane (b = " + num(b) + ", c = " + num(c) + ")";
  TORCH_CHECK_VALUE(id != 0, op, ": `regions` holds 0 (no region)", at_plane,
                    ", which has instances: every voxel of a plane with instances belongs to the "
                    "region of its nearest instance; compute the regions with "
                    "blobbench.voronoi_regions(instances)");
  TORCH_CHECK_VALUE(false, op, ": `regions` holds region id ", num(id), at_plane,
                    " where `instances` has no voxel with that id (each region must contain its "
                    "instance; compute the regions with blobbench.voronoi_regions(instances))");
}

// The finalisation on the host (the CPU's fused path): loss and the coefficient table from the
// (B, C, K, ns) stats. Returns the first plane * K + k of an invalid region, or -1.
int64_t finalize_cc_host(const double* stats, int64_t B, int64_t C, int64_t K, const LossParams& prm,
                      double* loss, double* coef) {
  const int64_t P = B * C;
  const int64_t ns = cc::num_stats(prm), nc = cc::num_coef(prm);
  const bool softmax = prm.activation == kSoftmax;
  const double ld = prm.lambda_dice, lc = prm.lambda_ce;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(K, 1));
  std::vector<PlaneResult> pr(P);
  std::vector<RegionTerm> global(P);
  std::vector<int64_t> bad(P, -1);
  at::parallel_for(0, P, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double* st = stats + i * K * ns;
      double I = 0, Pq = 0, T = 0, E = 0;
      for (int64_t k = 0; k < K; ++k) {
        I += st[k * ns + kColI];
        Pq += st[k * ns + kColP];
        T += st[k * ns + kColT];
        if (prm.with_ce) E += st[k * ns + kColE];
      }
      const RegionTerm g = region_term(I, T, Pq, 0.0, 0.0, prm);
      global[i] = g;
      PlaneResult& r = pr[i];
      r.totals = PlaneTotals{0, 0, 0, 0};
      r.global_loss = prm.with_ce ? ld * g.loss + lc * E * prm.inv_voxels : g.loss;
      r.blob = PlaneBlob{0, 0, 0, 0};
      if (softmax && i % C == 0) continue;  // the background class: global term only
      for (int64_t k = 0; k < K; ++k) {
        const double* e = st + k * ns;
        if (e[kColN] <= 0.0) continue;
        if (e[kColT] <= 0.0) {
          if (!(k == 0 && T <= 0.0) && bad[i] < 0) bad[i] = k;
          continue;
        }
        const RegionTerm t = region_term(e[kColI], e[kColT], e[kColP], 0.0, 0.0, prm);
        r.blob.loss_sum += prm.with_ce ? ld * t.loss + lc * e[kColE] / e[kColN] : t.loss;
        r.blob.count += 1.0;
      }
    }
  });
  for (int64_t i = 0; i < P; ++i) {
    if (bad[i] >= 0) return i * K + bad[i];
  }
  std::vector<double> w_blob(P);
  double w_global = 0.0;
  *loss = combine_planes(pr.data(), B, C, prm, w_blob.data(), &w_global);
  at::parallel_for(0, P, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double* st = stats + i * K * ns;
      const RegionTerm& g = global[i];
      for (int64_t k = 0; k < K; ++k) {
        const double* e = st + k * ns;
        double a = ld * w_global * g.d_target, b = ld * w_global * g.d_pow;
        double ce = lc * w_global * prm.inv_voxels;
        if (w_blob[i] != 0.0 && e[kColN] > 0.0) {
          const RegionTerm t = region_term(e[kColI], e[kColT], e[kColP], 0.0, 0.0, prm);
          a += ld * w_blob[i] * t.d_target;
          b += ld * w_blob[i] * t.d_pow;
          ce += lc * w_blob[i] / e[kColN];
        }
        double* ck = coef + (i * K + k) * nc;
        ck[0] = a;
        ck[1] = b;
        if (prm.with_ce) ck[2] = ce;
      }
    }
  });
  return -1;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const Kernels* k, const at::Tensor& input,
                                                       const at::Tensor& instances,
                                                       const at::Tensor& regions,
                                                       const LossParams& prm_in, int64_t max_label,
                                                       const char* op) {
  check_inputs(input, instances, prm_in.activation, max_label, op);
  check_regions(regions, instances, op);
  LossParams prm = prm_in;
  const int64_t B = input.size(0), C = input.size(1);
  prm.inv_voxels = double(B * C) / double(input.numel());
  const bool fused = k != nullptr && !use_composite();
  if (prm.with_ce && prm.activation == kNoActivation) {
    // The cross-entropy of probabilities is defined on [0, 1]: the CPU raises; the composite on
    // another device cannot without a sync and makes the result NaN (below).
    if (input.is_cpu()) {
      TORCH_CHECK_VALUE(!at::logical_or(input.lt(0), input.gt(1)).any().item<bool>(), op,
                        ": with activation=\"none\" `input` must hold probabilities in [0, 1] "
                        "(the domain of the binary cross-entropy), found values outside");
    }
  }
  LabelRange range = resolve_labels(regions, prm.activation, max_label,
                                    cc::num_stats(prm) + cc::num_coef(prm), op, "regions");
  const bool compacted = range.label_ids.size(2) > 0;
  if (!fused) {
    CompositeOut out = forward_composite(input, instances, regions, range, prm, op);
    if (prm.with_ce && prm.activation == kNoActivation && !input.is_cpu()) {
      const at::Tensor bad = at::logical_or(input.lt(0), input.gt(1)).any();
      const double nan = std::numeric_limits<double>::quiet_NaN();
      out.loss.masked_fill_(bad, nan);
      out.coef.masked_fill_(bad, nan);
    }
    if (input.is_cpu()) {
      // The composite flags bad ids with NaN (no sync); on the CPU, where a sync is free, the
      // flags say what was wrong, as the fused path does.
      if (out.bad_ids.item<bool>()) {
        raise_bad_ids(instances, regions, max_label, prm.activation, op);
      }
      if (out.bad_region.any().item<bool>()) {
        const int64_t first = out.bad_region.reshape({-1}).nonzero()[0][0].item<int64_t>();
        raise_bad_region(first / range.K, first % range.K, C, range, op);
      }
    }
    return {out.loss, widen_table(out.coef, range.out_K), range.label_ids};
  }
  if (compacted) {
    // The kernel sees compacted indices, not ids: compare the ids here (this path already sorts).
    const at::Tensor inst = read_labels(instances, prm.activation);
    const at::Tensor reg = read_labels(regions, prm.activation);
    if (inst.ne(0).logical_and(inst.ne(reg)).any().item<bool>()) {
      raise_bad_ids(instances, regions, -1, prm.activation, op);
    }
  }
  at::Tensor stats = at::empty({B, C, range.K, cc::num_stats(prm)}, input.options().dtype(at::kDouble));
  // The kernels read regions and instances with one integer type: compacted indices are int64.
  const at::Tensor targets = instances.to(range.labels.scalar_type());
  const bool ok = k->accumulate(as_planes(input), as_planes(range.labels), as_planes(targets), prm,
                                range.K, range.bound, !compacted, stats);
  if (!ok) raise_bad_ids(instances, regions, max_label, prm.activation, op);
  at::Tensor coef = at::empty({B, C, range.K, cc::num_coef(prm)}, input.options().dtype(at::kDouble));
  double value = 0.0;
  const int64_t bad = finalize_cc_host(stats.data_ptr<double>(), B, C, range.K, prm, &value,
                                    coef.data_ptr<double>());
  if (bad >= 0) raise_bad_region(bad / range.K, bad % range.K, C, range, op);
  at::Tensor loss = at::empty({}, input.options().dtype(loss_dtype(input.scalar_type())));
  loss.fill_(value);
  return {loss, widen_table(coef, range.out_K), range.label_ids};
}

at::Tensor backward(const Kernels* k, const at::Tensor& grad, const at::Tensor& input,
                    const at::Tensor& instances, const at::Tensor& regions, const at::Tensor& coef,
                    const at::Tensor& label_ids, const LossParams& prm, const char* op) {
  check_backward_args(grad, input, instances, coef, label_ids, cc::num_coef(prm), op);
  check_regions(regions, instances, op);
  LossParams p = prm;
  p.inv_voxels = double(input.size(0) * input.size(1)) / double(input.numel());
  const at::Tensor lab = as_planes(table_labels(regions, label_ids, prm.activation));
  if (k == nullptr || use_composite()) {
    return backward_composite(grad, input, instances, lab, coef, p);
  }
  auto x = as_planes(input);
  // The gradient has the input's strides (as the blob ops' backward, blobbench/_ops.py).
  at::Tensor out = at::empty_like(input);
  const bool direct = out.is_contiguous();
  at::Tensor grad_input = direct ? out.view(x.sizes()) : at::empty_like(x);
  const at::Tensor targets = as_planes(instances.to(lab.scalar_type()));
  const bool ok = k->backward(grad, x, lab, targets, coef.contiguous(), p, grad_input);
  TORCH_CHECK_VALUE(ok, op, ": `regions` holds an id outside the coefficient table [0, ",
                    num(coef.size(2) - 1), "]");
  if (!direct) out.copy_(grad_input.view(input.sizes()));
  return out;
}

// ---- entry points ------------------------------------------------------------------------------

namespace {

void check_lambdas(double lambda_dice, double lambda_ce, const char* op) {
  TORCH_CHECK_VALUE(lambda_dice >= 0.0 && lambda_ce >= 0.0, op,
                    ": `lambda_dice` and `lambda_ce` must be >= 0, got ",
                    std::to_string(lambda_dice), " and ", std::to_string(lambda_ce));
}

void refuse_softmax_ce(int32_t activation, const char* op) {
  TORCH_CHECK_VALUE(activation != kSoftmax, op,
                    ": activation=\"softmax\" is not supported: CC Dice+CE takes one binary "
                    "cross-entropy per channel and per region (activation \"sigmoid\" or "
                    "\"none\"); use blob.cc_dice with softmax, or one sigmoid channel per class");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> dice_forward(
    const Kernels* k, const at::Tensor& input, const at::Tensor& instances,
    const at::Tensor& regions, double alpha, double beta, c10::string_view activation,
    bool squared_pred, double smooth_nr, double smooth_dr, int64_t max_label) {
  const char* op = "blob.cc_dice";
  const LossParams prm = make_cc_params(alpha, beta, std::string(activation), squared_pred,
                                        smooth_nr, smooth_dr, false, 1.0, 0.0, op);
  return forward(k, input, instances, regions, prm, max_label, op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dice_ce_forward(
    const Kernels* k, const at::Tensor& input, const at::Tensor& instances,
    const at::Tensor& regions, double alpha, double beta, double lambda_dice, double lambda_ce,
    c10::string_view activation, bool squared_pred, double smooth_nr, double smooth_dr,
    int64_t max_label) {
  const char* op = "blob.cc_dice_ce";
  const LossParams prm = make_cc_params(alpha, beta, std::string(activation), squared_pred,
                                        smooth_nr, smooth_dr, true, lambda_dice, lambda_ce, op);
  refuse_softmax_ce(prm.activation, op);
  check_lambdas(lambda_dice, lambda_ce, op);
  return forward(k, input, instances, regions, prm, max_label, op);
}

at::Tensor dice_backward(const Kernels* k, const at::Tensor& grad, const at::Tensor& input,
                         const at::Tensor& instances, const at::Tensor& regions,
                         const at::Tensor& coef, const at::Tensor& label_ids,
                         c10::string_view activation, bool squared_pred) {
  const char* op = "blob.cc_dice (backward)";
  const LossParams prm = make_cc_params(1.0, 1.0, std::string(activation), squared_pred, 0.0, 0.0,
                                        false, 1.0, 0.0, op);
  return backward(k, grad, input, instances, regions, coef, label_ids, prm, op);
}

at::Tensor dice_ce_backward(const Kernels* k, const at::Tensor& grad, const at::Tensor& input,
                            const at::Tensor& instances, const at::Tensor& regions,
                            const at::Tensor& coef, const at::Tensor& label_ids,
                            c10::string_view activation, bool squared_pred) {
  const char* op = "blob.cc_dice_ce (backward)";
  const LossParams prm = make_cc_params(1.0, 1.0, std::string(activation), squared_pred, 0.0, 0.0,
                                        true, 1.0, 1.0, op);
  refuse_softmax_ce(prm.activation, op);
  return backward(k, grad, input, instances, regions, coef, label_ids, prm, op);
}

}  // namespace cc

TORCH_LIBRARY_FRAGMENT(blob, m) {
  // Component-wise (Voronoi) losses: alpha * global + beta * (mean over regions of each plane's
  // Dice, or lambda_dice * Dice + lambda_ce * BCE), regions = blobbench.voronoi_regions(instances).
  m.def(
      "cc_dice(Tensor input, Tensor instances, Tensor regions, float alpha=1.0, float beta=1.0, *, "
      "str activation=\"sigmoid\", bool squared_pred=False, float smooth_nr=1e-5, "
      "float smooth_dr=1e-5, int max_label=-1) -> Tensor");
  m.def(
      "cc_dice_ce(Tensor input, Tensor instances, Tensor regions, float alpha=1.0, "
      "float beta=1.0, *, float lambda_dice=1.0, float lambda_ce=1.0, str activation=\"sigmoid\", "
      "bool squared_pred=False, float smooth_nr=1e-5, float smooth_dr=1e-5, int max_label=-1) "
      "-> Tensor");
  m.def(
      "_cc_dice_forward(Tensor input, Tensor instances, Tensor regions, float alpha, float beta, "
      "str activation, bool squared_pred, float smooth_nr, float smooth_dr, int max_label) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "_cc_dice_backward(Tensor grad, Tensor input, Tensor instances, Tensor regions, "
      "Tensor coef, Tensor label_ids, str activation, bool squared_pred) -> Tensor");
  m.def(
      "_cc_dice_ce_forward(Tensor input, Tensor instances, Tensor regions, float alpha, "
      "float beta, float lambda_dice, float lambda_ce, str activation, bool squared_pred, "
      "float smooth_nr, float smooth_dr, int max_label) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_cc_dice_ce_backward(Tensor grad, Tensor input, Tensor instances, Tensor regions, "
      "Tensor coef, Tensor label_ids, str activation, bool squared_pred) -> Tensor");
}

}  // namespace blob
