// Schemas of the blob loss operators and their device-independent glue.
//
// Public operators: blob::dice, blob::tversky (the losses) and blob::label_stats (the per-label
// sums). Private operators (leading underscore, as torchvision names its backward ops):
// blob::_dice_forward / blob::_tversky_forward return the loss together with the per-label
// coefficient table the one-pass backward needs and the compacted label ids;
// blob::_dice_backward / blob::_tversky_backward are that backward. Autograd is C++
// (autograd/blob_autograd.cpp): the public losses call the private forward op below the
// Autograd key and the private backward op in their backward, so no Python runs per call.
// Each device registers its kernels for every op in its own TORCH_LIBRARY_IMPL block
// (cpu/blob_loss_kernel.cpp, cuda/blob_loss_kernel.cu); the fake kernels are in
// blobbench/_ops.py.
//
// Per forward call: with `max_label` given, one pass over the voxels (accumulate) and a
// finalisation over the O(B*C*K) table, with no device-to-host sync while the dense table fits
// (kDenseTableBudget). Without `max_label`, one aminmax and one sync find the range first.
// Sparse ids beyond a dense table are compacted per (b, c) plane with a sort: that path syncs
// (docs/design.md, "Label ranges"). The backward is one more pass over the voxels.
#include "blob_ops.h"

#include "cuda_forward_plan.h"

#include <ATen/Parallel.h>
#include <Python.h>
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

// ---- opt-in CUDA paths ------------------------------------------------------------------------

const char* const kCudaPathNames[] = {
    "vector_loads",       // accumulate with 16-byte loads, prefetch and exact integer counts
    "coop_forward",       // the whole forward in one cooperative launch (two-launch fallback)
    "split_forward",      // forces the two-launch fallback of coop_forward (accumulate, then finish)
    "fused_dice_ce",      // blob Dice+CE in the accumulate/backward kernels (default: composite)
    "softmax_inf",        // online softmax that accepts -inf logits (default: NaN for a -inf)
    "parallel_finalize",  // finalisation parallel over labels (default: one block per plane)
};
const int kNumCudaPaths = int(sizeof(kCudaPathNames) / sizeof(kCudaPathNames[0]));

bool cuda_path_enabled(const std::string& name) {
  bool known = false;
  for (int i = 0; i < kNumCudaPaths; ++i) known = known || name == kCudaPathNames[i];
  TORCH_INTERNAL_ASSERT(known, "cuda_path_enabled: unknown path ", name);
  const char* env = std::getenv("BLOBBENCH_CUDA_PATHS");
  if (env == nullptr || *env == '\0') return false;
  bool on = false;
  const std::string list(env);
  size_t start = 0;
  while (start <= list.size()) {
    size_t end = list.find(',', start);
    if (end == std::string::npos) end = list.size();
    std::string token = list.substr(start, end - start);
    token.erase(0, token.find_first_not_of(" \t"));
    token.erase(token.find_last_not_of(" \t") + 1);
    if (!token.empty()) {
      bool valid = token == "all";
      for (int i = 0; i < kNumCudaPaths; ++i) valid = valid || token == kCudaPathNames[i];
      if (!valid) {
        std::string names = "all";
        for (int i = 0; i < kNumCudaPaths; ++i) names += std::string(", ") + kCudaPathNames[i];
        TORCH_CHECK_VALUE(false, "BLOBBENCH_CUDA_PATHS: unknown CUDA path '", token,
                          "'; expected a comma-separated list of: ", names);
      }
      // "all" is every path but split_forward, which only forces the fallback of coop_forward.
      on = on || (token == "all" && name != "split_forward") || token == name;
    }
    start = end + 1;
  }
  return on;
}

int64_t cuda_forced_blocks_per_plane() {
  const char* env = std::getenv("BLOBBENCH_CUDA_BLOCKS_PER_PLANE");
  if (env == nullptr || *env == '\0') return 0;
  const std::string value(env);
  const bool digits = value.size() <= 9 && value.find_first_not_of("0123456789") == std::string::npos;
  TORCH_CHECK_VALUE(digits && std::stoll(value) > 0,
                    "BLOBBENCH_CUDA_BLOCKS_PER_PLANE: expected a positive number of blocks per "
                    "plane (at most 9 digits), got '",
                    value, "'");
  return std::stoll(value);
}

namespace {

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

struct LabelRange {
  at::Tensor labels;     // what the kernels read: the instances, or compacted ids (int64)
  at::Tensor label_ids;  // (B, C, K) sorted ids per plane when compacted, else (B, C, 0)
  int64_t K;             // table size the kernels work on
  int64_t bound;         // ids must lie in [0, bound) (bound <= K)
  int64_t out_K;         // table size returned (>= K; > K where the CPU sized its work by the ids)
};

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

// The smallest and largest id the tables see (read_labels), with one device-to-host copy.
std::pair<int64_t, int64_t> id_range(const at::Tensor& instances, int32_t activation) {
  auto mm = at::aminmax(read_labels(instances, activation));
  at::Tensor both = at::stack({std::get<0>(mm).to(at::kLong), std::get<1>(mm).to(at::kLong)}).cpu();
  return {both[0].item<int64_t>(), both[1].item<int64_t>()};
}

// Raises on ids outside [0, max_label] (max_label < 0: no upper bound), saying which it was: a
// negative id, naming the smallest, or an id above max_label, naming the largest.
void check_id_range(int64_t lo, int64_t hi, int64_t max_label, const char* op) {
  TORCH_CHECK_VALUE(lo >= 0, op,
                    ": `instances` must be >= 0 (0 = background), found a negative id (the "
                    "smallest is ",
                    num(lo), ")");
  TORCH_CHECK_VALUE(max_label < 0 || hi <= max_label, op,
                    ": `instances` holds an id above max_label (the largest is ", num(hi),
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
                          const char* op) {
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
  check_id_range(summary[0].item<int64_t>(), summary[1].item<int64_t>(), max_label, op);
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
                          int64_t entries, const char* op) {
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
      check_id_range(lo, hi, max_label, op);
      LabelRange used = dense_range(instances, activation, hi);
      used.out_K = r.K;
      return used;
    }
    if (!instances.is_cpu()) return compact_labels(instances, activation, max_label, op);
    // CPU, a bound beyond the dense budget: a sync costs nothing there, so the ids present
    // decide, as without max_label (a dense table when they fit), and max_label is checked.
    const auto [lo, hi] = id_range(instances, activation);
    check_id_range(lo, hi, max_label, op);
    if (hi < dense_label_limit(V)) {
      LabelRange r = dense_range(instances, activation, std::max<int64_t>(hi, 1));
      r.bound = r.K;
      return r;
    }
    return compact_labels(instances, activation, max_label, op);
  }
  // One reduction and one device-to-host sync; max_label skips both.
  const auto [lo, max_id] = id_range(instances, activation);
  check_id_range(lo, max_id, -1, op);
  if (max_id < dense_label_limit(V)) {
    LabelRange r = dense_range(instances, activation, std::max<int64_t>(max_id, 1));
    r.bound = r.K;
    return r;
  }
  return compact_labels(instances, activation, -1, op);
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

}  // namespace

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

namespace {

// The one pass shared by the losses and label_stats: checks, label range, per-label sums.
struct Accumulated {
  at::Tensor stats;    // (B, C, K, 3 or 5) float64
  at::Tensor invalid;  // int32 scalar on the device (CUDA): an id outside [0, max_label] met
  LabelRange range;    // what the kernels read, the bound, the compacted ids (label_ids)
};

// The loss and coefficient table of a forward that DeviceKernels::forward may finish.
struct FusedForward {
  at::Tensor loss, coef;
  ForwardStatus status = kForwardNotHandled;
};

// `range_prm`: the op whose table sizes decide the label range (dense_for_bound); the composite
// Dice+CE accumulates Dice sums (prm) under Dice+CE's range. `fused`: the losses' forward, which
// the device's optional forward kernels may run in fewer launches (they decline the softmax case
// whose bound is below K, so the flag below is never needed after a finished forward).
Accumulated accumulate_stats(const DeviceKernels& kernels, const at::Tensor& input,
                             const at::Tensor& instances, const LossParams& prm, int64_t max_label,
                             const char* op, const LossParams* range_prm = nullptr,
                             FusedForward* fused = nullptr) {
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

}  // namespace

WarpRowPlan plan_warp_rows(int64_t planes, int64_t row_bytes, int64_t warps, int64_t blocks,
                           int64_t budget) {
  const int64_t per_block = warps * row_bytes;  // one block of one plane
  const int64_t budget_rows = budget / (planes * row_bytes);
  // (until issue 19 this was max(1, min(blocks, budget_rows / warps)) with all planes in one
  // launch, past the budget when budget_rows < warps)
  if (budget_rows >= warps) return {std::min(blocks, budget_rows / warps), planes};
  return {1, std::max<int64_t>(1, budget / per_block)};
}

int64_t warp_rows_budget() {
  const char* env = std::getenv("BLOBBENCH_WARP_ROWS_BUDGET");  // test-only, bytes
  if (env == nullptr || *env == '\0') return int64_t(256) << 20;
  char* end = nullptr;
  const long long v = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(end != env && *end == '\0' && v > 0,
                    "BLOBBENCH_WARP_ROWS_BUDGET: expected a positive number of bytes, got '", env,
                    "'");
  return int64_t(v);
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

}  // namespace

// ---- what the device registrations call ---------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> dice_forward(
    const DeviceKernels& k, const at::Tensor& input, const at::Tensor& instances, double alpha,
    double beta, c10::string_view activation, c10::string_view masking, bool squared_pred,
    double smooth_nr, double smooth_dr, int64_t max_label) {
  const char* op = "blob.dice";
  auto prm = make_params(kDice, alpha, beta, std::string(activation), std::string(masking),
                         squared_pred, smooth_nr, smooth_dr, 0.0, 0.0, op);
  return loss_forward(k, input, instances, prm, max_label, op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tversky_forward(
    const DeviceKernels& k, const at::Tensor& input, const at::Tensor& instances, double alpha,
    double beta, c10::string_view activation, c10::string_view masking, double fp_weight,
    double fn_weight, double smooth_nr, double smooth_dr, int64_t max_label) {
  const char* op = "blob.tversky";
  auto prm = make_params(kTversky, alpha, beta, std::string(activation), std::string(masking),
                         false, smooth_nr, smooth_dr, fp_weight, fn_weight, op);
  return loss_forward(k, input, instances, prm, max_label, op);
}

at::Tensor dice_backward(const DeviceKernels& k, const at::Tensor& grad, const at::Tensor& input,
                         const at::Tensor& instances, const at::Tensor& coef,
                         const at::Tensor& label_ids, c10::string_view activation,
                         bool squared_pred) {
  const char* op = "blob.dice (backward)";
  LossParams prm{};
  prm.kind = kDice;
  prm.activation = parse_activation(std::string(activation), op);
  prm.squared_pred = squared_pred;
  return loss_backward(k, grad, input, instances, coef, label_ids, prm, op);
}

at::Tensor tversky_backward(const DeviceKernels& k, const at::Tensor& grad, const at::Tensor& input,
                            const at::Tensor& instances, const at::Tensor& coef,
                            const at::Tensor& label_ids, c10::string_view activation) {
  const char* op = "blob.tversky (backward)";
  LossParams prm{};
  prm.kind = kTversky;
  prm.activation = parse_activation(std::string(activation), op);
  prm.squared_pred = false;
  return loss_backward(k, grad, input, instances, coef, label_ids, prm, op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dice_ce_forward(
    const DeviceKernels& k, const at::Tensor& input, const at::Tensor& instances, double alpha,
    double beta, double lambda_dice, double lambda_ce, c10::string_view activation,
    c10::string_view masking, bool squared_pred, double smooth_nr, double smooth_dr,
    int64_t max_label) {
  const char* op = "blob.dice_ce";
  auto prm = make_params(kDice, alpha, beta, std::string(activation), std::string(masking),
                         squared_pred, smooth_nr, smooth_dr, 0.0, 0.0, op);
  TORCH_CHECK_VALUE(prm.activation != kSoftmax, op,
                    ": activation=\"softmax\" is not supported: blob Dice+CE takes one binary "
                    "cross-entropy per channel and per instance (activation \"sigmoid\" or "
                    "\"none\"); use blob.dice with softmax, or one sigmoid channel per class");
  TORCH_CHECK_VALUE(lambda_dice >= 0.0 && lambda_ce >= 0.0, op,
                    ": `lambda_dice` and `lambda_ce` must be >= 0, got ",
                    std::to_string(lambda_dice), " and ", std::to_string(lambda_ce));
  prm.with_ce = true;
  prm.lambda_dice = lambda_dice;
  prm.lambda_ce = lambda_ce;
  if (input.dim() >= 2 && input.numel() > 0) {
    prm.inv_voxels = double(input.size(0) * input.size(1)) / double(input.numel());
  }
  auto out = loss_forward(k, input, instances, prm, max_label, op);
  if (prm.activation == kNoActivation) {
    // The cross-entropy of probabilities is defined on [0, 1] (torch's binary_cross_entropy
    // raises outside). The CPU raises; CUDA cannot without a sync and makes the result NaN.
    at::Tensor bad = at::logical_or(input.lt(0), input.gt(1)).any();
    if (!k.uses_invalid_flag) {
      TORCH_CHECK_VALUE(!bad.item<bool>(), op,
                        ": with activation=\"none\" `input` must hold probabilities in [0, 1] "
                        "(the domain of the binary cross-entropy), found values outside");
    } else {
      const double nan = std::numeric_limits<double>::quiet_NaN();
      std::get<0>(out).masked_fill_(bad, nan);
      std::get<1>(out).masked_fill_(bad, nan);
    }
  }
  return out;
}

at::Tensor dice_ce_backward(const DeviceKernels& k, const at::Tensor& grad, const at::Tensor& input,
                            const at::Tensor& instances, const at::Tensor& coef,
                            const at::Tensor& label_ids, c10::string_view activation,
                            bool squared_pred) {
  const char* op = "blob.dice_ce (backward)";
  LossParams prm{};
  prm.kind = kDice;
  prm.activation = parse_activation(std::string(activation), op);
  TORCH_CHECK_VALUE(prm.activation != kSoftmax, op,
                    ": activation=\"softmax\" is not supported by blob Dice+CE");
  prm.squared_pred = squared_pred;
  prm.with_ce = true;
  return loss_backward(k, grad, input, instances, coef, label_ids, prm, op);
}

std::tuple<at::Tensor, at::Tensor> label_stats(const DeviceKernels& k, const at::Tensor& input,
                                               const at::Tensor& instances,
                                               c10::string_view activation, bool squared_pred,
                                               int64_t max_label) {
  const char* op = "blob.label_stats";
  // The sums do not depend on the loss kind, weights or masking: Dice parameters with the
  // default masking select the accumulation (activation, squared_pred).
  auto prm = make_params(kDice, 1.0, 1.0, std::string(activation), "paper", squared_pred, 0.0, 0.0,
                         0.0, 0.0, op);
  Accumulated a = accumulate_stats(k, input, instances, prm, max_label, op);
  // An id above max_label on CUDA (no sync to raise): make the result unmistakable, as the loss.
  if (a.invalid.defined()) {
    a.stats.masked_fill_(a.invalid.ne(0), std::numeric_limits<double>::quiet_NaN());
  }
  return {widen_table(a.stats, a.range.out_K), a.range.label_ids};
}

TORCH_LIBRARY(blob, m) {
  // Whether an opt-in CUDA path is switched on by BLOBBENCH_CUDA_PATHS (host side, any device).
  m.def("_cuda_path_enabled(str name) -> bool", [](std::string name) {
    bool known = false;
    for (int i = 0; i < kNumCudaPaths; ++i) known = known || name == kCudaPathNames[i];
    std::string names;
    for (int i = 0; i < kNumCudaPaths; ++i) names += std::string(i ? ", " : "") + kCudaPathNames[i];
    TORCH_CHECK_VALUE(known, "blob._cuda_path_enabled: `name` must be one of ", names, ", got '",
                      name, "'");
    return cuda_path_enabled(name);
  });
  // plan_warp_rows (the CUDA deterministic accumulate's row budget), for the CPU tests:
  // (planes, row_bytes, warps, blocks, budget) -> [blocks, planes_per_launch].
  m.def("_warp_row_plan(int planes, int row_bytes, int warps, int blocks, int budget) -> int[]",
        [](int64_t planes, int64_t row_bytes, int64_t warps, int64_t blocks, int64_t budget) {
          TORCH_CHECK_VALUE(planes > 0 && row_bytes > 0 && warps > 0 && blocks > 0 && budget > 0,
                            "blob._warp_row_plan: every argument must be > 0");
          const WarpRowPlan p = plan_warp_rows(planes, row_bytes, warps, blocks, budget);
          return std::vector<int64_t>{p.blocks, p.planes_per_launch};
        });
  // The launch plan of the opt-in CUDA forward paths (csrc/cuda_forward_plan.h), for the tests:
  // [mode (0 default, 1 one cooperative launch, 2 two launches), blocks per plane]. forced < 0
  // reads BLOBBENCH_CUDA_BLOCKS_PER_PLANE.
  m.def(
      "_cuda_forward_plan(int voxels, int planes, bool coop, bool split, bool coop_supported, "
      "int coop_resident, int acc_resident, int forced=-1) -> int[]",
      [](int64_t voxels, int64_t planes, bool coop, bool split, bool coop_supported,
         int64_t coop_resident, int64_t acc_resident, int64_t forced) {
        TORCH_CHECK_VALUE(voxels > 0 && planes > 0,
                          "blob._cuda_forward_plan: `voxels` and `planes` must be positive");
        if (forced < 0) forced = cuda_forced_blocks_per_plane();
        const ForwardPlan p = plan_forward(voxels, planes, coop, split, coop_supported,
                                           coop_resident, acc_resident, forced);
        return std::vector<int64_t>{p.mode, p.blocks};
      });
  // Public operators.
  m.def(
      "dice(Tensor input, Tensor instances, float alpha=2.0, float beta=1.0, *, "
      "str activation=\"sigmoid\", str masking=\"paper\", bool squared_pred=False, "
      "float smooth_nr=1e-5, float smooth_dr=1e-5, int max_label=-1) -> Tensor");
  m.def(
      "tversky(Tensor input, Tensor instances, float alpha=2.0, float beta=1.0, *, "
      "str activation=\"sigmoid\", str masking=\"paper\", float fp_weight=0.3, "
      "float fn_weight=0.7, float smooth_nr=1e-5, float smooth_dr=1e-5, int max_label=-1) "
      "-> Tensor");
  m.def(
      "label_stats(Tensor input, Tensor instances, *, str activation=\"sigmoid\", "
      "bool squared_pred=False, int max_label=-1) -> (Tensor, Tensor)");
  // Private operators: the losses' forward with what the backward needs, and the backward.
  m.def(
      "_dice_forward(Tensor input, Tensor instances, float alpha, float beta, str activation, "
      "str masking, bool squared_pred, float smooth_nr, float smooth_dr, int max_label) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "_dice_backward(Tensor grad, Tensor input, Tensor instances, Tensor coef, Tensor label_ids, "
      "str activation, bool squared_pred) -> Tensor");
  m.def(
      "_tversky_forward(Tensor input, Tensor instances, float alpha, float beta, str activation, "
      "str masking, float fp_weight, float fn_weight, float smooth_nr, float smooth_dr, "
      "int max_label) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_tversky_backward(Tensor grad, Tensor input, Tensor instances, Tensor coef, "
      "Tensor label_ids, str activation) -> Tensor");
  // Blob Dice+CE: every term lambda_dice * Dice + lambda_ce * binary cross-entropy.
  m.def(
      "dice_ce(Tensor input, Tensor instances, float alpha=2.0, float beta=1.0, *, "
      "float lambda_dice=1.0, float lambda_ce=1.0, str activation=\"sigmoid\", "
      "str masking=\"paper\", bool squared_pred=False, float smooth_nr=1e-5, "
      "float smooth_dr=1e-5, int max_label=-1) -> Tensor");
  m.def(
      "_dice_ce_forward(Tensor input, Tensor instances, float alpha, float beta, "
      "float lambda_dice, float lambda_ce, str activation, str masking, bool squared_pred, "
      "float smooth_nr, float smooth_dr, int max_label) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_dice_ce_backward(Tensor grad, Tensor input, Tensor instances, Tensor coef, "
      "Tensor label_ids, str activation, bool squared_pred) -> Tensor");
}

}  // namespace blob

// `import blobbench._C` loads the library and with it the registrations above.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
