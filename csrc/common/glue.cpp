// The shared machinery of common/glue.h: argument checks, label ranges, table helpers.
#include "glue.h"
#include "../cpu/isa.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cstdlib>
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

namespace detail {

int32_t parse_activation(const std::string& name, const char* op) {
  if (name == "sigmoid") return kSigmoid;
  if (name == "softmax") return kSoftmax;
  if (name == "none") return kNoActivation;
  TORCH_CHECK_VALUE(false, op,
                    ": `activation` must be one of \"sigmoid\", \"softmax\" or \"none\", got \"",
                    name, "\"");
}

int32_t parse_masking(const std::string& name, int32_t activation, const char* op) {
  int32_t m;
  if (name == "paper") {
    m = kPaper;
  } else if (name == "official") {
    m = kOfficial;
  } else {
    TORCH_CHECK_VALUE(false, op, ": `masking` must be \"paper\" or \"official\", got \"", name,
                      "\"");
  }
  TORCH_CHECK_VALUE(
      !(m == kOfficial && activation == kSoftmax), op,
      ": masking=\"official\" is only defined for activation \"sigmoid\" or \"none\" "
      "(the published code masks sigmoid logits); use masking=\"paper\" with softmax");
  return m;
}

bool is_label_dtype(at::ScalarType t) {
  return t == at::kByte || t == at::kShort || t == at::kInt || t == at::kLong;
}

// The checks every op entry runs on `input` and `instances` (the fake kernels in
// blobbench/_ops.py mirror them; tests/test_edge_cases.py holds the two to the same rules).
void check_tensors(const at::Tensor& input, const at::Tensor& instances, const char* op) {
  const auto st = input.scalar_type();
  TORCH_CHECK_TYPE(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble,
                   op, ": `input` must be a float16, bfloat16, float32 or float64 tensor, got ",
                   st);
  TORCH_CHECK_TYPE(
      is_label_dtype(instances.scalar_type()), op,
      ": `instances` must hold integer instance ids (uint8, int16, int32 or int64), got ",
      instances.scalar_type(),
      "; label a mask with blobbench.label_instances() or cast ids with .long()");
  TORCH_CHECK_VALUE(
      input.dim() >= 3 && input.dim() <= 5, op,
      ": `input` must have shape (B, C, *spatial) with 1 to 3 spatial dims, got shape ",
      shape(input.sizes()));
  TORCH_CHECK_VALUE(instances.sizes() == input.sizes(), op,
                    ": `instances` must have the shape of `input` (B, C, *spatial), got instances ",
                    shape(instances.sizes()), " and input ", shape(input.sizes()));
  TORCH_CHECK_VALUE(input.device() == instances.device(), op,
                    ": `input` and `instances` must be on the same device, got input on ",
                    input.device().str(), " and instances on ", instances.device().str());
  TORCH_CHECK_VALUE(input.numel() > 0, op,
                    ": `input` must not be empty (an empty batch has no loss), got shape ",
                    shape(input.sizes()));
}

void check_inputs(const at::Tensor& input, const at::Tensor& instances, int32_t activation,
                  int64_t max_label, const char* op) {
  check_tensors(input, instances, op);
  TORCH_CHECK_VALUE(activation != kSoftmax || input.size(1) >= 2, op,
                    ": activation=\"softmax\" needs at least 2 channels (channel 0 is the "
                    "background class), got C = ",
                    num(input.size(1)));
  TORCH_CHECK_VALUE(
      max_label >= -1, op,
      ": `max_label` must be -1 (find it) or an upper bound >= 0 on the instance ids, got ",
      num(max_label));
}


// Labels whose range matters: the instances, or for softmax all channels but 0 (whose target
// is derived from the other channels and which is never read).
at::Tensor read_labels(const at::Tensor& instances, int32_t activation) {
  return activation == kSoftmax ? instances.narrow(1, 1, instances.size(1) - 1) : instances;
}

// Whether a caller-bounded table of max_label + 1 entries per plane stays dense: always below
// dense_label_limit, and above it while stats and coefficients fit kDenseTableBudget. Written
// so that no int64 overflows (max_label may be 2^63 - 1). Mirrored by blobbench/_ops.py.
// `entries`: doubles per label in the op's tables (stats + coefficients: 5 for Dice and Tversky,
// 9 for Dice+CE).
bool dense_for_bound(int64_t max_label, int64_t planes, int64_t voxels_per_plane, int64_t entries) {
  if (max_label < dense_label_limit(voxels_per_plane)) return true;
  const int64_t per_label = planes * entries * int64_t(sizeof(double));
  return max_label < kDenseTableBudget / per_label;
}

// The compaction's input, (B*C, V): the instances, with softmax's channel 0 (never read) zeroed
// so that it neither widens the table nor trips the range checks.
at::Tensor compaction_source(const at::Tensor& instances, int32_t activation) {
  const int64_t B = instances.size(0), C = instances.size(1);
  at::Tensor src = instances.reshape({B, C, -1});
  if (activation == kSoftmax) {
    src = src.clone();
    src.select(1, 0).zero_();
  }
  return src.reshape({B * C, -1});
}

namespace {

// The smallest and largest of n ids, in a loop the compiler vectorises; compiled for the baseline
// ISA and for AVX2 (cpu/isa.h), whose 8-wide integer min and max the baseline lacks.
#define BLOB_SPAN_MIN_MAX                                            \
  template <typename T>                                              \
  std::pair<int64_t, int64_t> span_min_max(const T* p, int64_t n) { \
    T lo = p[0], hi = p[0];                                          \
    for (int64_t i = 1; i < n; ++i) {                                \
      lo = std::min(lo, p[i]);                                       \
      hi = std::max(hi, p[i]);                                       \
    }                                                                \
    return {int64_t(lo), int64_t(hi)};                               \
  }
namespace base {
BLOB_SPAN_MIN_MAX
}  // namespace base
#ifdef BLOB_CPU_MULTIVERSION
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
BLOB_SPAN_MIN_MAX
}  // namespace avx2
#pragma GCC pop_options
#endif
#undef BLOB_SPAN_MIN_MAX

template <typename T>
std::pair<int64_t, int64_t> span_min_max(const T* p, int64_t n) {
#ifdef BLOB_CPU_MULTIVERSION
  if (cpu_use_avx2()) return avx2::span_min_max(p, n);
#endif
  return base::span_min_max(p, n);
}

// id_range on the CPU without ATen ops, over read_labels' view of contiguous instances: its
// batch elements are contiguous rows of `span` ids (softmax's view starts each row at channel 1),
// read in place, in parallel over chunks of at least 2^16 ids. On the 2x1x32x64x64 batch of asv's
// GenerousMaxLabel (one thread, perf): ATen's aminmax alone took about 37 us per call, this loop
// about 20 us, with none of the small tensors that brought aminmax's result to the host
// (docs/design.md, 5.2).
std::pair<int64_t, int64_t> id_range_cpu(const at::Tensor& labels) {
  const int64_t rows = labels.size(0), span = labels.numel() / rows, row_stride = labels.stride(0);
  std::pair<int64_t, int64_t> out;
  AT_DISPATCH_INTEGRAL_TYPES(labels.scalar_type(), "blob_id_range", [&] {
    const scalar_t* base = labels.const_data_ptr<scalar_t>();
    const auto chunk = [&](int64_t begin, int64_t end, std::pair<int64_t, int64_t> r) {
      // [begin, end) in read order: row b = i / span, offset i % span in it.
      for (int64_t i = begin; i < end;) {
        const int64_t b = i / span, in_b = i % span;
        const int64_t n = std::min(end - i, span - in_b);
        const auto m = span_min_max(base + b * row_stride + in_b, n);
        r = {std::min(r.first, m.first), std::max(r.second, m.second)};
        i += n;
      }
      return r;
    };
    out = at::parallel_reduce(
        int64_t(0), rows * span, int64_t(1) << 16,
        std::pair<int64_t, int64_t>{std::numeric_limits<int64_t>::max(),
                                    std::numeric_limits<int64_t>::min()},
        chunk, [](std::pair<int64_t, int64_t> a, std::pair<int64_t, int64_t> b) {
          return std::pair<int64_t, int64_t>{std::min(a.first, b.first),
                                             std::max(a.second, b.second)};
        });
  });
  return out;
}

}  // namespace

// The smallest and largest id the tables see (read_labels), with one device-to-host copy.
std::pair<int64_t, int64_t> id_range(const at::Tensor& instances, int32_t activation) {
  const at::Tensor labels = read_labels(instances, activation);
  if (labels.is_cpu() && instances.is_contiguous() && labels.numel() > 0) {
    return id_range_cpu(labels);
  }
  auto mm = at::aminmax(labels);
  at::Tensor both = at::stack({std::get<0>(mm).to(at::kLong), std::get<1>(mm).to(at::kLong)}).cpu();
  return {both[0].item<int64_t>(), both[1].item<int64_t>()};
}

// Raises on ids outside [0, max_label] (max_label < 0: no upper bound), saying which it was: a
// negative id, naming the smallest, or an id above max_label, naming the largest.
void check_id_range(int64_t lo, int64_t hi, int64_t max_label, const char* op, const char* arg) {
  TORCH_CHECK_VALUE(lo >= 0, op, ": `", arg,
                    "` must be >= 0 (0 = background), found a negative id (the "
                    "smallest is ",
                    num(lo), ")");
  TORCH_CHECK_VALUE(max_label < 0 || hi <= max_label, op, ": `", arg,
                    "` holds an id above max_label (the largest is ", num(hi),
                    ", max_label = ", num(max_label), ")");
}

// A dense table of ids 0..max_id (max_id: max_label, or the largest id present). softmax stores
// its derived background in label 1 of channel 0, so its table has at least 2 labels.
LabelRange dense_range(const at::Tensor& instances, int32_t activation, int64_t max_id) {
  const int64_t B = instances.size(0), C = instances.size(1);
  LabelRange r;
  r.labels = instances;
  r.label_ids = at::empty({B, C, 0}, instances.options());
  r.bound = max_id + 1;
  r.K = activation == kSoftmax ? std::max<int64_t>(r.bound, 2) : r.bound;
  r.out_K = r.K;
  return r;
}

// Whether the CPU sizes a caller-bounded dense table by the ids present rather than by
// max_label: when the table would be large against the plane (more than 1024 labels and more
// than one per 64 voxels). One aminmax over the ids (a read of the labels, and no sync on the
// CPU) then replaces the zeroing, finalisation and coefficients of max_label + 1 labels per
// plane: a generous max_label costs about what the exact one does (docs/design.md, 5.2).
bool size_by_ids_present(const at::Tensor& instances, int64_t K, int64_t voxels_per_plane) {
  return instances.is_cpu() && K > 1024 && K > voxels_per_plane / 64;
}

// Sparse, large ids (e.g. a crop of a volume labelled as a whole): a dense table would be
// larger than the data, so each (b, c) plane's ids are mapped to 0..U-1 with a sort (0 is
// always in the table, at index 0). Costs a sort and one device-to-host sync; the backward
// repeats only a binary search per voxel.
LabelRange compact_labels(const at::Tensor& instances, int32_t activation, int64_t max_label,
                          const char* op, const char* arg) {
  const int64_t B = instances.size(0), C = instances.size(1), P = B * C;
  at::Tensor src = compaction_source(instances, activation);  // (P, V)
  const int64_t V = src.size(1);
  at::Tensor sorted = std::get<0>(at::cat({at::zeros({P, 1}, src.options()), src}, 1).sort(1));
  at::Tensor is_new = at::ones_like(sorted, sorted.options().dtype(at::kBool));
  is_new.narrow(1, 1, V).copy_(sorted.narrow(1, 1, V).ne(sorted.narrow(1, 0, V)));
  at::Tensor rank = is_new.cumsum(1, at::kLong).sub_(1);  // (P, V + 1)
  // The one sync: smallest id, largest id, largest number of distinct ids in a plane.
  at::Tensor summary = at::stack({sorted.select(1, 0).min().to(at::kLong),
                                  sorted.select(1, V).max().to(at::kLong), rank.select(1, V).max()})
                           .cpu();
  check_id_range(summary[0].item<int64_t>(), summary[1].item<int64_t>(), max_label, op, arg);
  const int64_t K = std::max<int64_t>(summary[2].item<int64_t>() + 1, 2);
  // Each plane's row: its distinct ids in order, padded with its largest id (searchsorted then
  // still returns the first, true, index of that id).
  at::Tensor ids = sorted.select(1, V).unsqueeze(1).expand({P, K}).contiguous();
  at::Tensor offsets = at::arange(P, rank.options()).mul_(K).unsqueeze(1);
  ids.view({-1}).index_put_({rank.add(offsets).masked_select(is_new)},
                            sorted.masked_select(is_new));
  LabelRange r;
  r.labels = at::searchsorted(ids, src).view({B, C, V});
  r.label_ids = ids.view({B, C, K});
  r.K = K;
  r.bound = K;
  r.out_K = K;
  return r;
}

LabelRange resolve_labels(const at::Tensor& instances, int32_t activation, int64_t max_label,
                          int64_t entries, const char* op, const char* arg) {
  const int64_t B = instances.size(0), C = instances.size(1);
  const int64_t V = instances.numel() / (B * C);
  if (max_label >= 0) {
    const bool dense = dense_for_bound(max_label, B * C, V, entries);
    if (dense) {
      LabelRange r = dense_range(instances, activation, max_label);
      if (!size_by_ids_present(instances, r.K, V)) {
        // No sync. The CPU raises on an id outside [0, max_label]; CUDA makes the loss NaN.
        return r;
      }
      // CPU, large table: the kernels work on the ids present; the tables returned keep
      // max_label's size (what the fake kernels promise), zero beyond (widen_table).
      const auto [lo, hi] = id_range(instances, activation);
      check_id_range(lo, hi, max_label, op, arg);
      LabelRange used = dense_range(instances, activation, hi);
      used.out_K = r.K;
      return used;
    }
    if (!instances.is_cpu()) return compact_labels(instances, activation, max_label, op, arg);
    // CPU, a bound beyond the dense budget: a sync costs nothing there, so the ids present
    // decide, as without max_label (a dense table when they fit), and max_label is checked.
    const auto [lo, hi] = id_range(instances, activation);
    check_id_range(lo, hi, max_label, op, arg);
    if (hi < dense_label_limit(V)) {
      LabelRange r = dense_range(instances, activation, std::max<int64_t>(hi, 1));
      r.bound = r.K;
      return r;
    }
    return compact_labels(instances, activation, max_label, op, arg);
  }
  // One reduction and one device-to-host sync; max_label skips both.
  const auto [lo, max_id] = id_range(instances, activation);
  check_id_range(lo, max_id, -1, op, arg);
  if (max_id < dense_label_limit(V)) {
    LabelRange r = dense_range(instances, activation, std::max<int64_t>(max_id, 1));
    r.bound = r.K;
    return r;
  }
  return compact_labels(instances, activation, -1, op, arg);
}

// A zero-filled float64 tensor. A large one on the CPU is an anonymous mapping, whose zero
// pages the OS maps only when touched: a table of which only the first rows of each plane are
// written costs what those rows cost (at::zeros would write every page).
at::Tensor lazy_zeros(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__unix__) || defined(__APPLE__)
  const int64_t bytes = c10::multiply_integers(sizes) * int64_t(sizeof(double));
  if (options.device().is_cpu() && bytes >= (int64_t(1) << 20)) {
    void* p = mmap(nullptr, size_t(bytes), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1,
                   0);
    if (p != MAP_FAILED) {
#ifdef MADV_NOHUGEPAGE
      // Where transparent huge pages are on for every mapping, the first write into each 2 MiB
      // would map and zero a whole huge page: small pages keep the untouched rows free.
      madvise(p, size_t(bytes), MADV_NOHUGEPAGE);
#endif
      return at::from_blob(
          p, sizes, [bytes](void* q) { munmap(q, size_t(bytes)); },
          options.dtype(at::kDouble));
    }
  }
#endif
  return at::zeros(sizes, options.dtype(at::kDouble));
}

// A (B, C, K, n) table of the kernels widened to the out_K labels the op returns: rows K..out_K-1
// (ids above every id present) are zero. On the CPU the zero pages of a large table are mapped
// lazily by the OS, so only the rows written cost anything.
at::Tensor widen_table(const at::Tensor& t, int64_t out_K) {
  const int64_t K = t.size(2);
  if (K == out_K) return t;
  std::vector<int64_t> sizes = t.sizes().vec();
  sizes[2] = out_K;
  at::Tensor out = lazy_zeros(sizes, t.options());
  out.narrow(2, 0, K).copy_(t);
  return out;
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
  p.with_ce = false;
  p.lambda_dice = 1.0;
  p.lambda_ce = 0.0;
  p.inv_voxels = 0.0;
  return p;
}

at::Tensor as_planes(const at::Tensor& t) {
  return t.contiguous().view({t.size(0), t.size(1), -1});
}

// What a loss of this input is returned as: float32 for half inputs (the sums are accumulated in
// float32 or wider, and MONAI's losses under autocast return float32), else input's dtype.
at::ScalarType loss_dtype(at::ScalarType input) {
  return input == at::kHalf || input == at::kBFloat16 ? at::kFloat : input;
}

// The labels the kernels read, as indices into the (B, C, K) table: the instances, or their
// positions in label_ids when the forward compacted them.
at::Tensor table_labels(const at::Tensor& instances, const at::Tensor& label_ids,
                        int32_t activation) {
  if (label_ids.size(2) == 0) return instances;
  const int64_t B = instances.size(0), C = instances.size(1), K = label_ids.size(2);
  return at::searchsorted(label_ids.reshape({B * C, K}), compaction_source(instances, activation))
      .view({B, C, -1});
}

at::ScalarType acc_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// Flat (B*C*V) indices into the (B*C*K) table. Ids outside [0, K) are clamped: they can only
// reach here on CUDA, where the invalid flag already turns the result into NaN.
at::Tensor flat_table_index(const at::Tensor& labels, int64_t K) {
  const int64_t B = labels.size(0), C = labels.size(1);
  at::Tensor idx = as_planes(labels).to(at::kLong).clamp(0, K - 1);
  return idx.add_(at::arange(B * C, idx.options()).mul_(K).view({B, C, 1})).view({-1});
}

// Per-voxel BCE in the form of the global term (column 0) and of the blob terms (column 1).
std::pair<at::Tensor, at::Tensor> voxel_bce(const at::Tensor& x, const at::Tensor& target,
                                            const LossParams& prm) {
  auto logits_form = [&] {
    at::Tensor z = at::where(target, x.neg(), x);
    return z.clamp_min(0).add_(x.abs().neg_().exp_().log1p_());
  };
  auto prob_form = [&] {
    at::Tensor p = prm.activation == kSigmoid ? x.sigmoid() : x;
    return at::where(target, p.log(), p.neg().log1p_()).clamp_min_(-100).neg_();
  };
  at::Tensor g = global_ce_on_logits(prm) ? logits_form() : prob_form();
  at::Tensor b = blob_ce_on_logits(prm) == global_ce_on_logits(prm)
                     ? at::Tensor()
                     : (blob_ce_on_logits(prm) ? logits_form() : prob_form());
  return {g, b};
}

// Validates every argument of a backward op (they can be called directly, e.g. by opcheck).
void check_backward_args(const at::Tensor& grad, const at::Tensor& input,
                         const at::Tensor& instances, const at::Tensor& coef,
                         const at::Tensor& label_ids, int64_t ncoef, const char* op) {
  check_tensors(input, instances, op);
  TORCH_CHECK_VALUE(grad.numel() == 1 && at::isFloatingType(grad.scalar_type()), op,
                    ": `grad` must be a floating scalar (the gradient of the loss), got shape ",
                    shape(grad.sizes()), " ", c10::toString(grad.scalar_type()));
  TORCH_CHECK_VALUE(
      coef.dim() == 4 && coef.size(0) == input.size(0) && coef.size(1) == input.size(1) &&
          coef.size(2) >= 1 && coef.size(3) == ncoef && coef.scalar_type() == at::kDouble,
      op, ": `coef` must be the (B, C, K, ", num(ncoef), ") float64 table of the forward op, got ",
      shape(coef.sizes()), " ", c10::toString(coef.scalar_type()));
  TORCH_CHECK_VALUE(label_ids.dim() == 3 && label_ids.size(0) == input.size(0) &&
                        label_ids.size(1) == input.size(1) &&
                        (label_ids.size(2) == 0 || label_ids.size(2) == coef.size(2)) &&
                        label_ids.scalar_type() == instances.scalar_type(),
                    op,
                    ": `label_ids` must be the (B, C, K) or (B, C, 0) ids of the forward op, of "
                    "`instances`' dtype, got ",
                    shape(label_ids.sizes()), " ", c10::toString(label_ids.scalar_type()));
  for (const at::Tensor* t : {&grad, &coef, &label_ids}) {
    TORCH_CHECK_VALUE(t->device() == input.device(), op,
                      ": `grad`, `coef` and `label_ids` must be on `input`'s device (",
                      input.device().str(), "), got ", t->device().str());
  }
}

}  // namespace detail
}  // namespace blob
