// The `blob` operator library: its TORCH_LIBRARY block (host-side helpers of every build; each
// operator family adds its schemas with TORCH_LIBRARY_FRAGMENT in its own file: blob loss in
// ops/blob_ops.cpp, the component-wise losses in ops/cc_ops.cpp) and the Python module blobbench._C.
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "../blob_ops.h"
#include "../cuda_forward_plan.h"

namespace blob {

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
}

}  // namespace blob

// `import blobbench._C` loads the library and with it the registrations above.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
