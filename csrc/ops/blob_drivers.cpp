// Drivers of the blob loss family (ops/blob_drivers.h): the host finalisation, the accumulate
// pass with its label range, the composite Dice+CE and the forward and backward of the losses,
// each run on one device's kernels (DeviceKernels, blob_ops.h).
//
// Per forward call: with `max_label` given, one pass over the voxels (accumulate) and a
// finalisation over the O(B*C*K) table, with no device-to-host sync while the dense table fits
// (kDenseTableBudget). Without `max_label`, one aminmax and one sync find the range first.
// Sparse ids beyond a dense table are compacted per (b, c) plane with a sort: that path syncs
// (docs/design.md, "Label ranges"). The backward is one more pass over the voxels.
#include "blob_drivers.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

namespace blob {

void finalize_host(const double* stats, int64_t B, int64_t C, int64_t K, const LossParams& prm,
                   double* loss, double* coef) {
  const int64_t P = B * C;
  const int64_t ns = num_stats(prm), nc = num_coef(prm);
  // Small tables are finalised inline: a thread-pool round trip costs more than the work.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(K, 1));
  std::vector<PlaneResult> pr(P);
  at::parallel_for(0, P, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double* st = stats + i * K * ns;
      PlaneResult& r = pr[i];
      r.totals = PlaneTotals{0, 0, 0, 0};
      double ce_sum = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        add_to_totals(r.totals, k, st + k * ns);
        if (prm.with_ce) ce_sum += st[k * ns + 3];
      }
      r.global_loss = global_term(r.totals, st, prm).loss;
      r.blob = PlaneBlob{0, 0, 0, 0};
      double blob_ce_sum = 0.0;
      const bool has_blob_term = !(prm.activation == kSoftmax && i % C == 0);
      if (has_blob_term) {
        for (int64_t k = 1; k < K; ++k) {
          const double* stk = st + k * ns;
          if (stk[2] > 0.0) {
            add_blob(r.blob, blob_term(r.totals, st, stk, prm));
            if (prm.with_ce) blob_ce_sum += blob_ce(r.totals, st, stk, prm);
          }
        }
      }
      if (prm.with_ce) {
        // Every term is lambda_dice * Dice + lambda_ce * BCE; the derivative sums in r.blob stay
        // those of the Dice terms (label_coef scales them by its weights).
        r.global_loss = prm.lambda_dice * r.global_loss + prm.lambda_ce * global_ce(ce_sum, prm);
        r.blob.loss_sum = prm.lambda_dice * r.blob.loss_sum + prm.lambda_ce * blob_ce_sum;
      }
    }
  });
  std::vector<double> w_blob(P);
  double w_global = 0.0;
  *loss = combine_planes(pr.data(), B, C, prm, w_blob.data(), &w_global);
  const double ld = prm.with_ce ? prm.lambda_dice : 1.0;
  at::parallel_for(0, P, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double* st = stats + i * K * ns;
      for (int64_t k = 0; k < K; ++k) {
        double* ck = coef + (i * K + k) * nc;
        if (!prm.with_ce) {
          label_coef(k, st, st + k * ns, pr[i].totals, pr[i].blob, w_global, w_blob[i], prm, ck);
        } else {
          label_coef(k, st, st + k * ns, pr[i].totals, pr[i].blob, ld * w_global, ld * w_blob[i],
                     prm, ck);
          label_ce_coef(k, st + k * ns, pr[i].blob.count, w_global, w_blob[i], prm, ck + 2);
        }
      }
    }
  });
}

namespace detail {

// `range_prm`: the op whose table sizes decide the label range (dense_for_bound); the composite
// Dice+CE accumulates Dice sums (prm) under Dice+CE's range. `fused`: the losses' forward, which
// the device's optional forward kernels may run in fewer launches (they decline the softmax case
// whose bound is below K, so the flag below is never needed after a finished forward).
Accumulated accumulate_stats(const DeviceKernels& kernels, const at::Tensor& input,
                             const at::Tensor& instances, const LossParams& prm, int64_t max_label,
                             const char* op, const LossParams* range_prm,
                             FusedForward* fused) {
  check_inputs(input, instances, prm.activation, max_label, op);
  const LossParams& rp = range_prm != nullptr ? *range_prm : prm;
  LabelRange range =
      resolve_labels(instances, prm.activation, max_label, num_stats(rp) + num_coef(rp), op);
  Accumulated a;
  a.stats = at::empty({input.size(0), input.size(1), range.K, num_stats(prm)},
                      input.options().dtype(at::kDouble));
  ForwardStatus status = kForwardNotHandled;
  // Planar views made once: as_planes copies a non-contiguous tensor, and both calls read them.
  const at::Tensor in_planes = as_planes(input);
  const at::Tensor label_planes = as_planes(range.labels);
  if (fused != nullptr && kernels.forward != nullptr) {
    fused->loss = at::empty({}, input.options().dtype(loss_dtype(input.scalar_type())));
    fused->coef = at::empty({input.size(0), input.size(1), range.K, num_coef(prm)},
                            input.options().dtype(at::kDouble));
    status = kernels.forward(in_planes, label_planes, prm, range.K, range.bound, a.stats,
                             a.invalid, fused->loss, fused->coef, op);
    fused->status = status;
  }
  if (status == kForwardNotHandled) {
    if (kernels.uses_invalid_flag) a.invalid = at::zeros({}, input.options().dtype(at::kInt));
    const bool ok = kernels.accumulate(in_planes, label_planes, prm, range.K, range.bound,
                                       a.stats, a.invalid, op);
    if (!ok) {
      // Only the CPU gets here (CUDA flags instead), and only with a dense table sized by
      // max_label (the other ranges were read from the ids): find what was wrong, and say it.
      const auto [lo, hi] = id_range(range.labels, prm.activation);
      check_id_range(lo, hi, range.bound - 1, op);
      TORCH_CHECK_VALUE(false, op, ": `instances` holds an id outside [0, max_label] (max_label = ",
                        num(range.bound - 1), ")");
    }
  }
  if (a.invalid.defined() && range.bound < range.K) {
    // Softmax with max_label = 0: the table holds 2 labels (channel 0's derived background is
    // label 1), and the CUDA kernels check ids against the table, so an id 1 of a channel >= 1
    // would pass. Flag it on the device (no sync): NaN, as the CPU raises.
    a.invalid.bitwise_or_(read_labels(range.labels, prm.activation).ge(range.bound).any());
  }
  a.range = range;
  return a;
}

namespace {

// ---- Dice+CE on devices without fused CE kernels ---------------------------------------------
// (CUDA for now: its kernels compute the Dice sums and the Dice gradient only.) The Dice part
// runs the device's kernels; each voxel's BCE and the BCE part of the gradient are elementwise
// ATen ops, the per-label BCE sums come from the device's accumulate kernel (deterministic
// exactly when its Dice sums are: on CUDA while the 8 warp tables of K x 3 sums fit in shared
// memory, about 2,400 labels in float32 and 1,200 in float64 on an H100 / H200, or under
// torch.use_deterministic_algorithms(True); beyond, without it, double atomics at run flushes),
// and the finalisation runs on the device (no sync with max_label). The same numbers as the fused CPU
// kernels, which the tests hold it to on the CPU through BLOBBENCH_DICE_CE=composite.

bool use_ce_composite(const DeviceKernels& kernels) {
  if (!kernels.fused_ce()) return true;
  const char* env = std::getenv("BLOBBENCH_DICE_CE");
  return env != nullptr && std::string(env) == "composite";
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dice_ce_forward_composite(
    const DeviceKernels& kernels, const at::Tensor& input, const at::Tensor& instances,
    const LossParams& prm, int64_t max_label, const char* op) {
  LossParams dice = prm;
  dice.with_ce = false;
  // The device's Dice pass, under the label range of the Dice+CE op (its tables are wider).
  Accumulated a = accumulate_stats(kernels, input, instances, dice, max_label, op, &prm);
  const LabelRange& range = a.range;
  const at::Tensor& stats3 = a.stats;
  const at::Tensor& invalid = a.invalid;
  const int64_t B = input.size(0), C = input.size(1), K = range.K;
  at::Tensor labels = as_planes(range.labels);
  // The per-label BCE sums, by the same device's accumulate kernel run on each voxel's BCE as a
  // "probability" (activation none): its sum column is the BCE sum, in the kernel's order: fixed
  // (bitwise reproducible) whenever that kernel's is, i.e. on CUDA while its warp tables fit in
  // shared memory (K up to ~2,400 in float32, ~1,200 in float64 on an H100 / H200) or under
  // deterministic algorithms; beyond that without them it uses double atomics, as the Dice sums.
  // (An index_add would use atomics on CUDA at any K.)
  at::Tensor x = as_planes(input).to(acc_dtype(input.scalar_type()));
  auto bce = voxel_bce(x, labels.gt(0), prm);
  LossParams sums = dice;
  sums.activation = kNoActivation;
  sums.masking = kPaper;
  sums.squared_pred = false;
  auto bce_sums = [&](const at::Tensor& values) {
    at::Tensor t = at::empty({B, C, K, kNumStats}, stats3.options());
    kernels.accumulate(values.contiguous(), labels, sums, K, range.bound, t, invalid, op);
    return t.narrow(3, 0, 1);
  };
  at::Tensor ce_g = bce_sums(bce.first);
  at::Tensor ce_b = bce.second.defined() ? bce_sums(bce.second) : ce_g;
  ce_g = ce_g.squeeze(-1);  // (B, C, K): per-label BCE sums, global form
  ce_b = ce_b.squeeze(-1);  // blob form
  // The finalisation on the device, without a sync (docs/design.md, "Dice + cross-entropy"). The
  // Dice part is the device's own finalisation with alpha and beta scaled by lambda_dice (the
  // total is linear in them); the BCE part is the same reduction written in ATen ops on the
  // (B, C, K) tables: every instance term of plane (b, c) weighs
  // w_blob = beta / (#batch elements with instances * #planes of b with instances * #instances).
  LossParams dice_w = dice;
  dice_w.alpha = prm.alpha * prm.lambda_dice;
  dice_w.beta = prm.beta * prm.lambda_dice;
  at::Tensor loss = at::empty({}, stats3.options());
  at::Tensor coef_ab = at::empty({B, C, K, kNumCoef}, stats3.options());
  kernels.finalize(stats3, invalid, dice_w, loss, coef_ab, op);

  const at::Tensor N = stats3.select(3, 2);  // (B, C, K) voxel counts
  const at::Tensor is_instance = at::arange(K, N.options().dtype(at::kLong)).gt(0);
  const at::Tensor present = N.gt(0).logical_and(is_instance);    // instance terms that exist
  const at::Tensor n_inst = present.sum(-1, false, at::kDouble);  // (B, C)
  const at::Tensor planes_with = n_inst.gt(0).sum(1, false, at::kDouble);  // (B)
  const at::Tensor batches_with = planes_with.gt(0).sum(at::kDouble);      // ()
  const at::Tensor denom = (batches_with * planes_with.unsqueeze(1) * n_inst).clamp_min(1.0);
  const at::Tensor w_blob = n_inst.gt(0).to(at::kDouble).mul(prm.beta).div(denom);  // (B, C)
  const double w_global = prm.alpha / double(B * C);
  const double inv_v = prm.inv_voxels;
  // BCE of the global term of each plane, and of each instance term.
  const at::Tensor ce_global = ce_g.sum(-1).mul(inv_v);         // (B, C)
  at::Tensor ce_inst = ce_b + ce_b.select(2, 0).unsqueeze(-1);  // E_0 + E_k
  if (blob_ce_on_logits(prm)) {
    // official masking: the other instances' voxels, logit 0 and target 0, add log 2 each
    const at::Tensor G = N.mul(is_instance).sum(-1, true);  // (B, C, 1) instance voxels
    ce_inst = ce_inst + (G - N).mul(0.6931471805599453);
  }
  ce_inst = ce_inst.mul(inv_v);
  const at::Tensor w_inst = w_blob.unsqueeze(-1) * present;  // (B, C, K)
  const at::Tensor ce_total =
      (ce_global.sum().mul(w_global) + (w_inst * ce_inst).sum()).mul(prm.lambda_ce);
  loss = (loss + ce_total).to(loss_dtype(input.scalar_type()));
  // Gradient coefficients of the BCE (label_ce_coef): the global term reaches every voxel, the
  // blob terms a voxel of instance k through L_k, a background voxel through every L_k.
  const double scale = prm.lambda_ce * inv_v;
  const at::Tensor blob_part =
      at::where(is_instance, w_inst, (w_blob * n_inst).unsqueeze(-1)).mul(scale);
  const at::Tensor global_part = at::full_like(blob_part, w_global * scale);
  const at::Tensor zero = at::zeros_like(blob_part);
  const at::Tensor c =
      (global_ce_on_logits(prm) ? global_part : zero) + (blob_ce_on_logits(prm) ? blob_part : zero);
  const at::Tensor d =
      (global_ce_on_logits(prm) ? zero : global_part) + (blob_ce_on_logits(prm) ? zero : blob_part);
  at::Tensor coef = at::cat({coef_ab, c.unsqueeze(-1), d.unsqueeze(-1)}, -1);
  if (invalid.defined()) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    loss.masked_fill_(invalid.ne(0), nan);
    coef.masked_fill_(invalid.ne(0), nan);
  }
  return {loss, widen_table(coef, range.out_K), range.label_ids};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_forward(const DeviceKernels& kernels,
                                                            const at::Tensor& input,
                                                            const at::Tensor& instances,
                                                            const LossParams& prm,
                                                            int64_t max_label, const char* op) {
  if (prm.with_ce && use_ce_composite(kernels)) {
    return dice_ce_forward_composite(kernels, input, instances, prm, max_label, op);
  }
  FusedForward fused;
  Accumulated a = accumulate_stats(kernels, input, instances, prm, max_label, op, nullptr, &fused);
  if (fused.status == kForwardDone) {
    return {fused.loss, widen_table(fused.coef, a.range.out_K), a.range.label_ids};
  }
  auto loss = fused.loss.defined()
                  ? fused.loss
                  : at::empty({}, input.options().dtype(loss_dtype(input.scalar_type())));
  auto coef = fused.coef.defined()
                  ? fused.coef
                  : at::empty({input.size(0), input.size(1), a.stats.size(2), num_coef(prm)},
                              input.options().dtype(at::kDouble));
  kernels.finalize(a.stats, a.invalid, prm, loss, coef, op);
  return {loss, widen_table(coef, a.range.out_K), a.range.label_ids};
}

at::Tensor loss_backward(const DeviceKernels& kernels, const at::Tensor& grad_out,
                         const at::Tensor& input, const at::Tensor& instances,
                         const at::Tensor& coef, const at::Tensor& label_ids, const LossParams& prm,
                         const char* op) {
  check_backward_args(grad_out, input, instances, coef, label_ids, num_coef(prm), op);
  auto x = as_planes(input);
  auto lab = as_planes(table_labels(instances, label_ids, prm.activation));
  // The gradient has the input's strides, as the fake kernel says (blobbench/_ops.py) and as
  // autograd prefers (a leaf's .grad is then used as is); the kernels write a contiguous one,
  // copied into those strides when they differ (e.g. channels_last_3d).
  at::Tensor out = at::empty_like(input);
  const bool direct = out.is_contiguous();
  at::Tensor grad_input = direct ? out.view(x.sizes()) : at::empty_like(x);
  const bool composite = prm.with_ce && use_ce_composite(kernels);
  LossParams dice = prm;
  if (composite) dice.with_ce = false;
  at::Tensor cf = composite ? coef.narrow(3, 0, kNumCoef).contiguous() : coef.contiguous();
  // grad_out as given (any floating dtype, one element): each device reads it in double.
  const bool ok = kernels.backward(grad_out, x, lab, cf, dice, grad_input, op);
  TORCH_CHECK_VALUE(ok, op, ": `instances` holds an id outside the coefficient table [0, ",
                    num(coef.size(2) - 1), "]");
  if (composite) {
    // The BCE part: grad_out * (c[l] (p - y) + d[l] dBCE/dp act'(x)), c and d from the table.
    const int64_t K = coef.size(2);
    at::Tensor idx = flat_table_index(lab, K).view(lab.sizes());
    at::Tensor c =
        coef.select(3, 2).reshape({-1}).index_select(0, idx.view({-1})).view(lab.sizes());
    at::Tensor d =
        coef.select(3, 3).reshape({-1}).index_select(0, idx.view({-1})).view(lab.sizes());
    const auto acc = acc_dtype(input.scalar_type());
    at::Tensor xa = x.to(acc);
    at::Tensor p = prm.activation == kSigmoid ? xa.sigmoid() : xa;
    at::Tensor y = lab.gt(0).to(acc);
    at::Tensor py = p - y;
    at::Tensor pq = p * (1 - p);
    at::Tensor dprob = py / pq.clamp_min(static_cast<double>(1e-12f));
    if (prm.activation == kSigmoid) dprob.mul_(pq);
    at::Tensor g = c.to(acc).mul(py).add_(d.to(acc).mul(dprob));
    g.mul_(grad_out.reshape({}).to(acc));
    grad_input.add_(g.to(grad_input.scalar_type()));
  }
  if (!direct) out.copy_(grad_input.view(input.sizes()));
  return out;
}

}  // namespace detail
}  // namespace blob
