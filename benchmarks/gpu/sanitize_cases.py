"""Small fused-op calls for compute-sanitizer (memcheck, racecheck): every kernel path once."""
import torch

import blobbench

torch.manual_seed(0)
shape = (2, 3, 5, 37, 41)  # odd sizes: partial tiles
inst = torch.randint(0, 6, shape, device="cuda", dtype=torch.int32) * (torch.rand(shape, device="cuda") > 0.7)
for dtype in (torch.float32, torch.float64, torch.float16):
    x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    for kw in (dict(), dict(activation="softmax"), dict(squared_pred=True, masking="official"),
               dict(max_label=9)):
        blobbench.blob_dice(x, inst, **kw).backward()
        blobbench.blob_tversky(x, inst.to(torch.uint8)).backward()
# a label range beyond shared memory: global atomics, then deterministic per-warp rows
big = torch.randint(0, 9000, shape, device="cuda", dtype=torch.int64) * (torch.rand(shape, device="cuda") > 0.5)
x = torch.randn(shape, device="cuda", requires_grad=True)
blobbench.blob_dice(x, big).backward()
torch.use_deterministic_algorithms(True)
blobbench.blob_dice(x, big).backward()
blobbench.blob_dice(x, big, activation="softmax").backward()
torch.cuda.synchronize()
print("sanitize cases ran")
