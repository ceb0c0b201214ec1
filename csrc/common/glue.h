// Device-independent machinery shared by every operator family (blob loss in ops/blob_*.cpp,
// the component-wise (Voronoi) losses in ops/cc_*.cpp): argument checks, the label range
// (dense table, caller bound, per-plane compaction: docs/design.md 5.2), table helpers and the
// ATen building blocks of the composite (non-fused) paths.
//
// Host code only: the CUDA sources include blob_ops.h, never this header, so that changing it
// recompiles .cpp files only.
#pragma once

#include <string>
#include <utility>

#include "../blob_ops.h"

namespace blob {
namespace detail {

// ---- arguments --------------------------------------------------------------------------------
int32_t parse_activation(const std::string& name, const char* op);
int32_t parse_masking(const std::string& name, int32_t activation, const char* op);
bool is_label_dtype(at::ScalarType t);
// The checks every op entry runs on `input` and `instances` (the fake kernels in
// blobbench/_ops.py mirror them; tests/test_edge_cases.py holds the two to the same rules).
void check_tensors(const at::Tensor& input, const at::Tensor& instances, const char* op);
void check_inputs(const at::Tensor& input, const at::Tensor& instances, int32_t activation,
                  int64_t max_label, const char* op);
// Validates every argument of a backward op (they can be called directly, e.g. by opcheck).
void check_backward_args(const at::Tensor& grad, const at::Tensor& input,
                         const at::Tensor& instances, const at::Tensor& coef,
                         const at::Tensor& label_ids, int64_t ncoef, const char* op);
LossParams make_params(int32_t kind, double alpha, double beta, const std::string& activation,
                       const std::string& masking, bool squared_pred, double smooth_nr,
                       double smooth_dr, double tversky_fp, double tversky_fn, const char* op);

// ---- label ranges (docs/design.md 5.2) --------------------------------------------------------
// `arg` names the id tensor in error messages (`instances` for the blob ops, `regions` for the
// component-wise ones, whose tables are indexed by the region ids).
struct LabelRange {
  at::Tensor labels;     // what the kernels read: the ids, or compacted ids (int64)
  at::Tensor label_ids;  // (B, C, K) sorted ids per plane when compacted, else (B, C, 0)
  int64_t K;             // table size the kernels work on
  int64_t bound;         // ids must lie in [0, bound) (bound <= K)
  int64_t out_K;         // table size returned (>= K; > K where the CPU sized its work by the ids)
};

// Labels whose range matters: the ids, or for softmax all channels but 0 (whose target is
// derived from the other channels and which is never read).
at::Tensor read_labels(const at::Tensor& instances, int32_t activation);
// Whether a caller-bounded table of max_label + 1 entries per plane stays dense (`entries`:
// doubles per label in the op's stats and coefficient tables). Mirrored by blobbench/_ops.py.
bool dense_for_bound(int64_t max_label, int64_t planes, int64_t voxels_per_plane, int64_t entries);
// The compaction's input, (B*C, V), softmax's channel 0 zeroed.
at::Tensor compaction_source(const at::Tensor& instances, int32_t activation);
// The smallest and largest id the tables see (read_labels), with one device-to-host copy.
std::pair<int64_t, int64_t> id_range(const at::Tensor& instances, int32_t activation);
// Raises on ids outside [0, max_label] (max_label < 0: no upper bound), naming `arg`.
void check_id_range(int64_t lo, int64_t hi, int64_t max_label, const char* op,
                    const char* arg = "instances");
LabelRange dense_range(const at::Tensor& instances, int32_t activation, int64_t max_id);
bool size_by_ids_present(const at::Tensor& instances, int64_t K, int64_t voxels_per_plane);
LabelRange compact_labels(const at::Tensor& instances, int32_t activation, int64_t max_label,
                          const char* op, const char* arg = "instances");
// The label range of an op: dense, caller-bounded, sized by the ids present, or compacted.
LabelRange resolve_labels(const at::Tensor& instances, int32_t activation, int64_t max_label,
                          int64_t entries, const char* op, const char* arg = "instances");
// The ids the backward reads, as indices into the (B, C, K) table (searchsorted in label_ids
// when the forward compacted them).
at::Tensor table_labels(const at::Tensor& instances, const at::Tensor& label_ids,
                        int32_t activation);

// ---- tables and tensors -----------------------------------------------------------------------
at::Tensor lazy_zeros(at::IntArrayRef sizes, const at::TensorOptions& options);
// A (B, C, K, n) table widened to out_K labels (rows K..out_K-1 zero).
at::Tensor widen_table(const at::Tensor& t, int64_t out_K);
at::Tensor as_planes(const at::Tensor& t);
// float32 for half inputs, else input's dtype.
at::ScalarType loss_dtype(at::ScalarType input);
// The accumulation dtype of the composite paths: float64 for float64 input, else float32.
at::ScalarType acc_dtype(at::ScalarType input);
// Flat (B*C*V) indices into the (B*C*K) table, ids clamped to [0, K).
at::Tensor flat_table_index(const at::Tensor& labels, int64_t K);
// Per-voxel BCE in the form of the global term (first) and of the blob terms (second; undefined
// when the two forms agree), as torch computes them (blob_loss_math.h, bce_logits / bce_prob).
std::pair<at::Tensor, at::Tensor> voxel_bce(const at::Tensor& x, const at::Tensor& target,
                                            const LossParams& prm);

}  // namespace detail
}  // namespace blob
