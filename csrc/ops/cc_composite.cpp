// The component-wise losses as a composite of ATen ops (cc_ops.h): the path of every device
// without fused CC kernels (CUDA: no new device code; registered below), and of the CPU under
// BLOBBENCH_CC=composite, so that the tests hold it to the loop and to the fused CPU kernels
// without a GPU.
//
// Forward: p = act(x) elementwise, the per-voxel columns (p t, p^q, t, 1[, BCE]) summed per
// region into a float64 table with index_add (on CUDA with atomics: the sums are float64, their
// order is not fixed unless torch.use_deterministic_algorithms(True) is set), the finalisation
// as ATen ops on the (B, C, K) tables: no device-to-host sync when max_label is given. Backward:
// the coefficients gathered per voxel, elementwise ops (and the softmax's channel sum).
#include "cc_ops.h"

#include <limits>

namespace blob {
namespace cc {

using namespace detail;

namespace {

// Per voxel: activation, target t and table index, with softmax's channel 0 the background class
// (its target and its index: "no instance in channels 1..C-1", 0 or 1, as the blob kernels).
struct Voxels {
  at::Tensor x, p, t, idx;  // (B, C, V); t bool; idx flat into (B * C * K)
};

Voxels voxels(const at::Tensor& input, const at::Tensor& instances, const at::Tensor& labels,
              int64_t K, const LossParams& prm) {
  Voxels v;
  v.x = as_planes(input).to(acc_dtype(input.scalar_type()));
  const at::Tensor inst = as_planes(instances);
  at::Tensor lab = as_planes(labels).to(at::kLong);
  v.t = inst.gt(0);
  if (prm.activation == kSigmoid) {
    v.p = v.x.sigmoid();
  } else if (prm.activation == kSoftmax) {
    v.p = v.x.softmax(1);
    const at::Tensor derived = inst.narrow(1, 1, inst.size(1) - 1).eq(0).all(1);  // (B, V)
    v.t = v.t.clone();
    v.t.select(1, 0).copy_(derived);
    lab = lab.clone();
    lab.select(1, 0).copy_(derived);
  } else {
    v.p = v.x;
  }
  v.idx = flat_table_index(lab, K).view(lab.sizes());
  return v;
}

at::Tensor dpow(const at::Tensor& p, const LossParams& prm) {
  return prm.squared_pred ? p * 2 : at::ones_like(p);
}

}  // namespace

CompositeOut forward_composite(const at::Tensor& input, const at::Tensor& instances,
                               const at::Tensor& regions, const LabelRange& range,
                               const LossParams& prm, const char* /*op*/) {
  const int64_t B = input.size(0), C = input.size(1), K = range.K;
  const bool softmax = prm.activation == kSoftmax;
  const Voxels v = voxels(input, instances, range.labels, K, prm);
  const auto f64 = input.options().dtype(at::kDouble);
  // Bad ids, without a sync: a region index outside [0, bound) (max_label given, dense table),
  // an instance voxel whose region is not its id.
  const at::Tensor lab_read = read_labels(as_planes(range.labels), prm.activation);
  at::Tensor bad_ids = lab_read.lt(0).logical_or(lab_read.ge(range.bound)).any();
  {
    const at::Tensor inst = read_labels(as_planes(instances), prm.activation);
    const at::Tensor reg = read_labels(as_planes(regions), prm.activation);
    bad_ids = bad_ids.logical_or(inst.ne(0).logical_and(inst.ne(reg)).any());
  }
  // The per-region sums, one float64 column at a time.
  const at::Tensor pd = v.p.to(at::kDouble), td = v.t.to(at::kDouble);
  std::vector<at::Tensor> cols = {pd * td, prm.squared_pred ? pd * pd : pd, td, at::ones_like(pd)};
  if (prm.with_ce) cols.push_back(voxel_bce(v.x, v.t, prm).first.to(at::kDouble));
  const at::Tensor flat = v.idx.reshape({-1});
  std::vector<at::Tensor> sums;
  for (const at::Tensor& c : cols) {
    sums.push_back(at::zeros({B * C * K}, f64).index_add_(0, flat, c.reshape({-1})).view({B, C, K}));
  }
  const at::Tensor& I = sums[kColI];
  const at::Tensor& Pq = sums[kColP];
  const at::Tensor& T = sums[kColT];
  const at::Tensor& N = sums[kColN];
  const double nr = prm.smooth_nr, dr = prm.smooth_dr, ld = prm.lambda_dice, lc = prm.lambda_ce;
  const double inv_v = prm.inv_voxels;

  // Global term of each plane (B, C) from the plane totals.
  const at::Tensor Tall = T.sum(-1);
  const at::Tensor num_g = I.sum(-1).mul(2).add(nr);
  const at::Tensor den_g = Pq.sum(-1).add(Tall).add(dr);
  at::Tensor Lg = 1 - num_g / den_g;
  if (prm.with_ce) Lg = Lg.mul(ld).add(sums[kColE].sum(-1).mul(lc * inv_v));
  // Region terms (B, C, K), in the planes with instances (and a CC term: not softmax's channel 0).
  at::Tensor cc_plane = Tall.gt(0);
  if (softmax) {
    cc_plane = cc_plane.clone();
    cc_plane.select(1, 0).fill_(false);
  }
  const at::Tensor present = N.gt(0).logical_and(T.gt(0)).logical_and(cc_plane.unsqueeze(-1));
  const at::Tensor num_r = I.mul(2).add(nr);
  const at::Tensor den_r = Pq.add(T).add(dr);
  at::Tensor Lr = 1 - num_r / den_r;
  if (prm.with_ce) Lr = Lr.mul(ld).add(sums[kColE].div(N.clamp_min(1)).mul(lc));
  Lr = at::where(present, Lr, at::zeros_like(Lr));
  // A region present without instance voxels, except region 0 of a plane without instances.
  const at::Tensor is_zero = at::arange(K, N.options().dtype(at::kLong)).eq(0);
  at::Tensor bad_region = N.gt(0).logical_and(T.le(0)).logical_and(
      is_zero.logical_and(Tall.le(0).unsqueeze(-1)).logical_not());
  if (softmax) bad_region.select(1, 0).fill_(false);

  // The reduction (combine_planes): mean over a plane's regions, over the planes of a batch
  // element with regions, over the batch elements with regions; the global term over all (b, c).
  const at::Tensor count = present.sum(-1, false, at::kDouble);            // (B, C)
  const at::Tensor has = count.gt(0);
  const at::Tensor planes_with = has.sum(1, false, at::kDouble);          // (B)
  const at::Tensor batches_with = planes_with.gt(0).sum(at::kDouble);     // ()
  const at::Tensor denom = (batches_with * planes_with.unsqueeze(1) * count).clamp_min(1.0);
  const at::Tensor w_blob = has.to(at::kDouble).mul(prm.beta).div(denom);  // (B, C)
  const double w_global = prm.alpha / double(B * C);
  at::Tensor loss = Lg.sum().mul(w_global).add((w_blob.unsqueeze(-1) * Lr).sum());

  // Coefficients: dL/dp = a t + b q p^(q-1) (+ e times the BCE's derivative).
  const at::Tensor wb = w_blob.unsqueeze(-1) * present;  // (B, C, K)
  const at::Tensor a =
      den_g.reciprocal().mul(-2.0 * w_global).unsqueeze(-1).add(wb.mul(-2.0).div(den_r)).mul(ld);
  const at::Tensor b = (num_g / den_g.square()).unsqueeze(-1).mul(w_global)
                           .add(wb * num_r / den_r.square())
                           .mul(ld);
  std::vector<at::Tensor> coef_cols = {a.expand({B, C, K}), b.expand({B, C, K})};
  if (prm.with_ce) {
    coef_cols.push_back(wb.div(N.clamp_min(1)).add(w_global * inv_v).mul(lc));
  }
  at::Tensor coef = at::stack(coef_cols, -1).contiguous();
  const at::Tensor invalid = bad_ids.logical_or(bad_region.any());
  const double nan = std::numeric_limits<double>::quiet_NaN();
  loss.masked_fill_(invalid, nan);
  coef.masked_fill_(invalid, nan);
  return {loss.to(loss_dtype(input.scalar_type())), coef, bad_ids, bad_region};
}

at::Tensor backward_composite(const at::Tensor& grad, const at::Tensor& input,
                              const at::Tensor& instances, const at::Tensor& labels,
                              const at::Tensor& coef, const LossParams& prm) {
  const int64_t K = coef.size(2);
  const Voxels v = voxels(input, instances, labels, K, prm);
  const auto acc = v.x.scalar_type();
  auto gather = [&](int64_t col) {
    return coef.select(3, col).reshape({-1}).index_select(0, v.idx.reshape({-1}))
        .view(v.idx.sizes()).to(acc);
  };
  const at::Tensor t = v.t.to(acc);
  at::Tensor g = gather(0).mul(t).add(gather(1).mul(dpow(v.p, prm)));  // dL/dp
  at::Tensor gx;
  if (prm.activation == kSoftmax) {
    gx = v.p * (g - (v.p * g).sum(1, true));
  } else {
    const at::Tensor pq = v.p * (1 - v.p);
    if (prm.with_ce && prm.activation == kNoActivation) {
      g = g.add(gather(2).mul((v.p - t) / pq.clamp_min(static_cast<double>(1e-12f))));
    }
    gx = prm.activation == kSigmoid ? g * pq : g;
    if (prm.with_ce && prm.activation == kSigmoid) gx = gx.add(gather(2).mul(v.p - t));
  }
  gx = gx.mul(grad.reshape({}).to(acc));
  at::Tensor out = at::empty_like(input);
  out.copy_(gx.to(input.scalar_type()).view(input.sizes()));
  return out;
}

}  // namespace cc

#ifdef BLOB_WITH_CUDA
// CUDA: the composite (no CC device code). The Autograd kernels are in autograd/cc_autograd.cpp.
TORCH_LIBRARY_IMPL(blob, CUDA, m) {
  using Ops = cc::DeviceOps<nullptr>;
  m.impl("cc_dice", &Ops::dice);
  m.impl("_cc_dice_forward", &Ops::dice_forward);
  m.impl("_cc_dice_backward", &Ops::dice_backward);
  m.impl("cc_dice_ce", &Ops::dice_ce);
  m.impl("_cc_dice_ce_forward", &Ops::dice_ce_forward);
  m.impl("_cc_dice_ce_backward", &Ops::dice_ce_backward);
}
#endif

}  // namespace blob
