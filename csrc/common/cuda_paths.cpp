// Host side of the CUDA paths, device-independent and compiled in every build: the opt-in switch
// BLOBBENCH_CUDA_PATHS (docs/design.md 5.6), the test aid BLOBBENCH_CUDA_BLOCKS_PER_PLANE and the
// row budget of the deterministic accumulate (plan_warp_rows). Declared in blob_ops.h.
#include "../blob_ops.h"

#include <cstdlib>
#include <string>

namespace blob {

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

}  // namespace blob
