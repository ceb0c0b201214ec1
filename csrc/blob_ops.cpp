// Schemas of the blob loss operators and their device-independent glue.
//
// blob::dice is the public operator. It is CompositeImplicitAutograd: it calls
// blob::dice_forward, which returns the loss together with the per-label coefficient table that
// the one-pass backward (blob::dice_backward) needs, and the sorted label ids when the label
// range was compacted. Autograd, the fake kernels and the Python-side checks of these ops live
// in blobbench/_ops.py.
//
// Per call: an optional aminmax over the labels (skipped when max_label is given: then there is
// no device-to-host sync at all), one pass over the voxels (accumulate), a finalisation over
// the O(B*C*K) table, and in the backward one more pass over the voxels.
#include "blob_ops.h"

#include <ATen/Parallel.h>
#include <Python.h>

#include <algorithm>
#include <limits>
#include <string>
#include <vector>

namespace blob {

std::string num(int64_t v) { return std::to_string(v); }

std::string shape(at::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + ")";
}

int64_t dense_label_limit(int64_t voxels_per_plane) {
  return std::max<int64_t>(int64_t(1) << 16, voxels_per_plane / 8);
}

namespace {

int32_t parse_activation(const std::string& name, const char* op) {
  if (name == "sigmoid") return kSigmoid;
  if (name == "softmax") return kSoftmax;
  if (name == "none") return kNoActivation;
  TORCH_CHECK_VALUE(false, op, ": `activation` must be one of \"sigmoid\", \"softmax\" or \"none\", got \"",
                    name, "\"");
}

int32_t parse_masking(const std::string& name, int32_t activation, const char* op) {
  int32_t m;
  if (name == "paper") {
    m = kPaper;
  } else if (name == "official") {
    m = kOfficial;
  } else {
    TORCH_CHECK_VALUE(false, op, ": `masking` must be \"paper\" or \"official\", got \"", name, "\"");
  }
  TORCH_CHECK_VALUE(!(m == kOfficial && activation == kSoftmax), op,
                    ": masking=\"official\" is only defined for activation \"sigmoid\" or \"none\" "
                    "(the published code masks sigmoid logits); use masking=\"paper\" with softmax");
  return m;
}

bool is_label_dtype(at::ScalarType t) {
  return t == at::kByte || t == at::kShort || t == at::kInt || t == at::kLong;
}

void check_inputs(const at::Tensor& input, const at::Tensor& instances, int32_t activation,
                  int64_t max_label, const char* op) {
  const auto st = input.scalar_type();
  TORCH_CHECK_TYPE(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble,
                   op, ": `input` must be a float16, bfloat16, float32 or float64 tensor, got ", st);
  TORCH_CHECK_TYPE(is_label_dtype(instances.scalar_type()), op,
                   ": `instances` must hold integer instance ids (uint8, int16, int32 or int64), got ",
                   instances.scalar_type(),
                   "; label a mask with blobbench.label_instances() or cast ids with .long()");
  TORCH_CHECK_VALUE(input.dim() >= 3 && input.dim() <= 5, op,
                    ": `input` must have shape (B, C, *spatial) with 1 to 3 spatial dims, got shape ",
                    shape(input.sizes()));
  TORCH_CHECK_VALUE(instances.sizes() == input.sizes(), op,
                    ": `instances` must have the shape of `input` (B, C, *spatial), got instances ",
                    shape(instances.sizes()), " and input ", shape(input.sizes()));
  TORCH_CHECK_VALUE(input.device() == instances.device(), op,
                    ": `input` and `instances` must be on the same device, got input on ",
                    input.device(), " and instances on ", instances.device());
  TORCH_CHECK_VALUE(input.numel() > 0, op, ": `input` must not be empty, got shape ",
                    shape(input.sizes()));
  TORCH_CHECK_VALUE(activation != kSoftmax || input.size(1) >= 2, op,
                    ": activation=\"softmax\" needs at least 2 channels (channel 0 is the "
                    "background class), got C = ",
                    num(input.size(1)));
  TORCH_CHECK_VALUE(max_label >= -1, op,
                    ": `max_label` must be -1 (find it) or an upper bound >= 0 on the instance ids, got ",
                    num(max_label));
}

struct LabelRange {
  at::Tensor labels;     // what the kernels read: the instances, or compacted ids (int64)
  at::Tensor label_ids;  // sorted distinct ids when compacted, else empty
  int64_t K;             // table size
};

// Labels the kernels may read: the instances, or for softmax all channels but 0 (whose target
// is derived from the other channels and which is never read).
at::Tensor read_labels(const at::Tensor& instances, int32_t activation) {
  return activation == kSoftmax ? instances.narrow(1, 1, instances.size(1) - 1) : instances;
}

LabelRange resolve_labels(const at::Tensor& instances, int32_t activation, int64_t max_label,
                          const char* op) {
  const int64_t V = instances.numel() / (instances.size(0) * instances.size(1));
  const int64_t limit = dense_label_limit(V);
  LabelRange r;
  int64_t max_id = max_label;
  if (max_label < 0) {
    // One reduction and one device-to-host sync; max_label skips both.
    auto mm = at::aminmax(read_labels(instances, activation));
    const int64_t lo = std::get<0>(mm).item<int64_t>();
    max_id = std::get<1>(mm).item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0, op, ": `instances` must be >= 0 (0 = background), found ", num(lo));
  }
  if (max_id + 1 <= limit) {
    r.labels = instances;
    r.label_ids = at::empty({0}, instances.options());
    r.K = std::max<int64_t>(max_id + 1, 2);  // softmax stores its derived background in label 1
    return r;
  }
  // Sparse, large ids (e.g. a crop of a volume labelled as a whole): a dense table would be
  // larger than the data, so map the ids to 0..U-1 with a sort. 0 stays 0 (it is always in the
  // table). Costs a sort and a sync; the backward repeats only a binary search.
  auto lab = read_labels(instances, activation);
  auto ids = std::get<0>(at::_unique2(
      at::cat({at::zeros({1}, lab.options()), lab.reshape({-1})}), /*sorted=*/true,
      /*return_inverse=*/false, /*return_counts=*/false));
  const int64_t lo = ids[0].item<int64_t>();
  TORCH_CHECK_VALUE(lo >= 0, op, ": `instances` must be >= 0 (0 = background), found ", num(lo));
  if (max_label >= 0) {
    const int64_t hi = ids[-1].item<int64_t>();
    TORCH_CHECK_VALUE(hi <= max_label, op, ": `instances` holds id ", num(hi), " above max_label = ",
                      num(max_label));
  }
  r.label_ids = ids;
  r.labels = at::searchsorted(ids, instances.contiguous());
  r.K = std::max<int64_t>(ids.numel(), 2);
  return r;
}

LossParams make_params(int32_t kind, double alpha, double beta, const std::string& activation,
                       const std::string& masking, bool squared_pred, double smooth_nr,
                       double smooth_dr, double tversky_fp, double tversky_fn, const char* op) {
  LossParams p{};
  p.kind = kind;
  p.activation = parse_activation(activation, op);
  p.masking = parse_masking(masking, p.activation, op);
  p.squared_pred = kind == kDice && squared_pred;
  p.smooth_nr = smooth_nr;
  p.smooth_dr = smooth_dr;
  p.tversky_fp = tversky_fp;
  p.tversky_fn = tversky_fn;
  p.alpha = alpha;
  p.beta = beta;
  return p;
}

at::Tensor as_planes(const at::Tensor& t) {
  return t.contiguous().view({t.size(0), t.size(1), -1});
}

}  // namespace

void finalize_host(const double* stats, int64_t B, int64_t C, int64_t K, const LossParams& prm,
                   double* loss, double* coef) {
  const int64_t P = B * C;
  std::vector<PlaneResult> pr(P);
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double* st = stats + i * K * kNumStats;
      PlaneResult& r = pr[i];
      r.totals = PlaneTotals{0, 0, 0, 0};
      for (int64_t k = 0; k < K; ++k) add_to_totals(r.totals, k, st + k * kNumStats);
      r.global_loss = global_term(r.totals, st, prm).loss;
      r.blob = PlaneBlob{0, 0, 0, 0};
      const bool has_blob_term = !(prm.activation == kSoftmax && i % C == 0);
      if (has_blob_term) {
        for (int64_t k = 1; k < K; ++k) {
          if (st[k * kNumStats + 2] > 0.0) add_blob(r.blob, blob_term(r.totals, st, st + k * kNumStats, prm));
        }
      }
    }
  });
  std::vector<double> w_blob(P);
  double w_global = 0.0;
  *loss = combine_planes(pr.data(), B, C, prm, w_blob.data(), &w_global);
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double* st = stats + i * K * kNumStats;
      for (int64_t k = 0; k < K; ++k) {
        label_coef(k, st, st + k * kNumStats, pr[i].totals, pr[i].blob, w_global, w_blob[i], prm,
                   coef + (i * K + k) * kNumCoef);
      }
    }
  });
}

namespace {

// The one pass shared by the losses and label_stats: checks, label range, per-label sums.
struct Accumulated {
  at::Tensor stats;      // (B, C, K, 3) float64
  at::Tensor invalid;    // int32 scalar on the device: an id outside [0, K) was met (CUDA)
  at::Tensor label_ids;  // compacted ids, or empty
};

Accumulated accumulate_stats(const DeviceKernels& kernels, const at::Tensor& input,
                             const at::Tensor& instances, const LossParams& prm,
                             int64_t max_label, const char* op) {
  check_inputs(input, instances, prm.activation, max_label, op);
  LabelRange range = resolve_labels(instances, prm.activation, max_label, op);
  Accumulated a;
  a.stats = at::zeros({input.size(0), input.size(1), range.K, kNumStats},
                      input.options().dtype(at::kDouble));
  a.invalid = at::zeros({}, input.options().dtype(at::kInt));
  kernels.accumulate(as_planes(input), as_planes(range.labels), prm, range.K, a.stats, a.invalid);
  a.label_ids = range.label_ids;
  return a;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_forward(
    const DeviceKernels& kernels, const at::Tensor& input, const at::Tensor& instances,
    const LossParams& prm, int64_t max_label, const char* op) {
  Accumulated a = accumulate_stats(kernels, input, instances, prm, max_label, op);
  auto f64 = input.options().dtype(at::kDouble);
  auto loss = at::empty({}, f64);
  auto coef = at::empty({input.size(0), input.size(1), a.stats.size(2), kNumCoef}, f64);
  kernels.finalize(a.stats, a.invalid, prm, loss, coef);
  return {loss.to(input.scalar_type()), coef, a.label_ids};
}

at::Tensor loss_backward(const DeviceKernels& kernels, const at::Tensor& grad_out,
                         const at::Tensor& input, const at::Tensor& instances,
                         const at::Tensor& coef, const at::Tensor& label_ids,
                         const LossParams& prm, const char* op) {
  TORCH_CHECK_VALUE(coef.dim() == 4 && coef.size(0) == input.size(0) &&
                        coef.size(1) == input.size(1) && coef.size(3) == kNumCoef &&
                        coef.scalar_type() == at::kDouble,
                    op, ": `coef` must be the (B, C, K, 2) float64 table of the forward op, got ",
                    shape(coef.sizes()), " ", coef.scalar_type());
  TORCH_CHECK_VALUE(grad_out.numel() == 1, op, ": `grad` must be a scalar, got shape ",
                    shape(grad_out.sizes()));
  at::Tensor labels =
      label_ids.numel() > 0 ? at::searchsorted(label_ids, instances.contiguous()) : instances;
  auto x = as_planes(input);
  auto lab = as_planes(labels);
  auto grad_input = at::empty_like(x);
  kernels.backward(grad_out.reshape({}).to(at::kDouble), x, lab, coef.contiguous(), prm,
                   grad_input);
  return grad_input.view(input.sizes());
}

// ---- the dispatcher-facing functions ------------------------------------------------------

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_dice_forward(
    const at::Tensor& input, const at::Tensor& instances, double alpha, double beta,
    c10::string_view activation, c10::string_view masking, bool squared_pred, double smooth_nr,
    double smooth_dr, int64_t max_label) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("blob::dice_forward", "")
                       .typed<decltype(call_dice_forward)>();
  return op.call(input, instances, alpha, beta, activation, masking, squared_pred, smooth_nr,
                 smooth_dr, max_label);
}

at::Tensor dice_composite(const at::Tensor& input, const at::Tensor& instances, double alpha,
                          double beta, c10::string_view activation, c10::string_view masking,
                          bool squared_pred, double smooth_nr, double smooth_dr,
                          int64_t max_label) {
  return std::get<0>(call_dice_forward(input, instances, alpha, beta, activation, masking,
                                       squared_pred, smooth_nr, smooth_dr, max_label));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_tversky_forward(
    const at::Tensor& input, const at::Tensor& instances, double alpha, double beta,
    c10::string_view activation, c10::string_view masking, double fp_weight, double fn_weight,
    double smooth_nr, double smooth_dr, int64_t max_label) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("blob::tversky_forward", "")
                       .typed<decltype(call_tversky_forward)>();
  return op.call(input, instances, alpha, beta, activation, masking, fp_weight, fn_weight,
                 smooth_nr, smooth_dr, max_label);
}

at::Tensor tversky_composite(const at::Tensor& input, const at::Tensor& instances, double alpha,
                             double beta, c10::string_view activation, c10::string_view masking,
                             double fp_weight, double fn_weight, double smooth_nr,
                             double smooth_dr, int64_t max_label) {
  return std::get<0>(call_tversky_forward(input, instances, alpha, beta, activation, masking,
                                          fp_weight, fn_weight, smooth_nr, smooth_dr, max_label));
}

}  // namespace

// Device registrations call these with their kernels.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dice_forward_with(
    const DeviceKernels& k, const at::Tensor& input, const at::Tensor& instances, double alpha,
    double beta, c10::string_view activation, c10::string_view masking, bool squared_pred,
    double smooth_nr, double smooth_dr, int64_t max_label) {
  const char* op = "blob.dice";
  auto prm = make_params(kDice, alpha, beta, std::string(activation), std::string(masking),
                         squared_pred, smooth_nr, smooth_dr, 0.0, 0.0, op);
  return loss_forward(k, input, instances, prm, max_label, op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tversky_forward_with(
    const DeviceKernels& k, const at::Tensor& input, const at::Tensor& instances, double alpha,
    double beta, c10::string_view activation, c10::string_view masking, double fp_weight,
    double fn_weight, double smooth_nr, double smooth_dr, int64_t max_label) {
  const char* op = "blob.tversky";
  auto prm = make_params(kTversky, alpha, beta, std::string(activation), std::string(masking),
                         false, smooth_nr, smooth_dr, fp_weight, fn_weight, op);
  return loss_forward(k, input, instances, prm, max_label, op);
}

at::Tensor backward_with(const DeviceKernels& k, const at::Tensor& grad, const at::Tensor& input,
                         const at::Tensor& instances, const at::Tensor& coef,
                         const at::Tensor& label_ids, c10::string_view activation,
                         bool squared_pred) {
  const char* op = "blob.dice_backward";
  LossParams prm{};
  prm.kind = kDice;
  prm.activation = parse_activation(std::string(activation), op);
  prm.squared_pred = squared_pred;
  return loss_backward(k, grad, input, instances, coef, label_ids, prm, op);
}

std::tuple<at::Tensor, at::Tensor> label_stats_with(const DeviceKernels& k, const at::Tensor& input,
                                                    const at::Tensor& instances,
                                                    c10::string_view activation,
                                                    bool squared_pred, int64_t max_label) {
  const char* op = "blob.label_stats";
  // The sums do not depend on the loss kind, weights or masking: Dice parameters with the
  // default masking select the accumulation (activation, squared_pred).
  auto prm = make_params(kDice, 1.0, 1.0, std::string(activation), "paper", squared_pred, 0.0,
                         0.0, 0.0, 0.0, op);
  Accumulated a = accumulate_stats(k, input, instances, prm, max_label, op);
  // An id above max_label on CUDA (no sync to raise): make the result unmistakable, as the loss.
  a.stats.masked_fill_(a.invalid.ne(0), std::numeric_limits<double>::quiet_NaN());
  return {a.stats, a.label_ids};
}

TORCH_LIBRARY(blob, m) {
  m.def(
      "dice(Tensor input, Tensor instances, float alpha=2.0, float beta=1.0, *, "
      "str activation=\"sigmoid\", str masking=\"paper\", bool squared_pred=False, "
      "float smooth_nr=1e-5, float smooth_dr=1e-5, int max_label=-1) -> Tensor");
  m.def(
      "dice_forward(Tensor input, Tensor instances, float alpha, float beta, str activation, "
      "str masking, bool squared_pred, float smooth_nr, float smooth_dr, int max_label) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "dice_backward(Tensor grad, Tensor input, Tensor instances, Tensor coef, Tensor label_ids, "
      "str activation, bool squared_pred) -> Tensor");
  m.def(
      "tversky(Tensor input, Tensor instances, float alpha=2.0, float beta=1.0, *, "
      "str activation=\"sigmoid\", str masking=\"paper\", float fp_weight=0.3, "
      "float fn_weight=0.7, float smooth_nr=1e-5, float smooth_dr=1e-5, int max_label=-1) "
      "-> Tensor");
  m.def(
      "tversky_forward(Tensor input, Tensor instances, float alpha, float beta, str activation, "
      "str masking, float fp_weight, float fn_weight, float smooth_nr, float smooth_dr, "
      "int max_label) -> (Tensor, Tensor, Tensor)");
  m.def(
      "tversky_backward(Tensor grad, Tensor input, Tensor instances, Tensor coef, "
      "Tensor label_ids, str activation) -> Tensor");
  m.def(
      "label_stats(Tensor input, Tensor instances, *, str activation=\"sigmoid\", "
      "bool squared_pred=False, int max_label=-1) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(blob, CompositeImplicitAutograd, m) {
  m.impl("dice", &dice_composite);
  m.impl("tversky", &tversky_composite);
}

}  // namespace blob

// `import blobbench._C` loads the library and with it the registrations above.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
