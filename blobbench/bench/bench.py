"""The benchmark engine behind ``blobbench``: cases, implementations and measurements.

Every measurement (one case, one implementation, one device) runs in a fresh process forked from
a clean server that has only imported the libraries (``multiprocessing`` "forkserver"), so that

- peak memory is the process's own: on the CPU the peak resident set (Linux ``VmHWM``, reset after
  a warm-up on a tiny input and after the inputs exist) sees every allocation, whichever allocator
  made it; on CUDA ``torch.cuda.max_memory_allocated`` above the inputs;
- a memory budget can be enforced (an address-space limit on the CPU, a per-process memory
  fraction on CUDA) and a time budget too (the process is killed), so an implementation that
  needs too much is recorded as ``"out of memory"`` or ``"over budget"``, not a crash.

Timing: one untimed call after the inputs exist (its time and memory are the "first call"), then
up to ``reps`` timed calls of forward + backward (at least 3 unless ``reps`` is smaller, fewer
than ``reps`` when they would take longer than ``max_case_s``), CUDA synchronised around each.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import resource
import time
import traceback
from dataclasses import asdict, dataclass, field

import torch

from .noise import load, summarize_times

__all__ = ["IMPLEMENTATIONS", "SWEEP_IMPLS", "LOSSES", "Case", "loss_fn", "forward_backward", "Runner",
           "profile_case", "instances_case", "volume_case", "file_case", "normalize_device",
           "normalize_devices", "devices_from_env", "synchronize", "cuda_budget_fraction",
           "cuda_memory_begin", "cuda_memory_peak", "memory_begin", "memory_peak", "host_cost_proxy",
           "OURS", "BASELINE_OF", "GATE_GROUPS", "PLANT_ENV", "PLANTED_IMPLS", "planted", "planted_slowdown",
           "allocator_memory", "timed_call", "CLOCKS"]

#: name -> (description, loss kind); the functions are built by :func:`loss_fn`.
IMPLEMENTATIONS = {
    "naive": "naive loop (MONAI DiceLoss per blob)",
    "vectorized": "vectorized closed form (index_add)",
    "fused": "fused blob.dice",
    "monai_dice": "MONAI DiceLoss (no instances)",
    "naive_tversky": "naive loop (MONAI TverskyLoss per blob)",
    "fused_tversky": "fused blob.tversky",
    "naive_dice_ce": "naive loop (MONAI DiceCELoss per blob)",
    "fused_dice_ce": "fused blob.dice_ce",
    "monai_dice_ce": "MONAI DiceCELoss (no instances)",
    "naive_cc_dice_ce": "naive loop (MONAI DiceCELoss per region)",
    "vectorized_cc_dice_ce": "vectorized CC-DiceCE (index_add)",
    "fused_cc_dice_ce": "fused blob.cc_dice_ce",
}
SWEEP_IMPLS = ("naive", "vectorized", "fused", "monai_dice")

#: Our implementations: the ones ``blobbench compare`` gates. Everything else (MONAI's losses, the
#: paper's loop with them) is a baseline no commit of ours changes: reported, never gated.
OURS = ("fused", "fused_tversky", "fused_dice_ce", "vectorized", "fused_cc_dice_ce")
#: ours -> the unchanged baseline its time is divided by (measured interleaved in the same run),
#: which cancels the machine's drift between two runs.
BASELINE_OF = {"fused": "monai_dice", "fused_tversky": "monai_dice", "vectorized": "monai_dice",
               "fused_dice_ce": "monai_dice_ce", "fused_cc_dice_ce": "monai_dice_ce"}
#: The gate's groups (``blobbench --gate``): each group is measured in one process per case, its
#: implementations' repetitions interleaved (the order rotating); one group, so that a round of
#: repetitions (every implementation once) takes a fraction of a second and one process start.
GATE_GROUPS = (("monai_dice", "fused", "fused_tversky", "monai_dice_ce", "fused_dice_ce"),)

#: Test-only: ``BLOBBENCH_PLANT_SLOWDOWN=F`` (a factor >= 1) makes every timed repetition of the
#: fused ops (:data:`PLANTED_IMPLS`) take F times as long, by busy-waiting (F - 1) x the call's
#: measured time inside the timed region; ``impl=F,impl=F`` (e.g. ``fused=1.3,fused_tversky=2``)
#: plants per op. Never set by default; recorded in result.json (``run.planted_slowdown``: the
#: largest factor, ``run.planted``: per op, and per measurement) so that a planted run is never
#: taken for a real one.
PLANT_ENV = "BLOBBENCH_PLANT_SLOWDOWN"
PLANTED_IMPLS = ("fused", "fused_tversky", "fused_dice_ce")


def _factor(v: str, spec: str) -> float:
    try:
        f = float(v)
    except ValueError:
        f = float("nan")
    if not f >= 1.0 or f == float("inf"):
        raise ValueError(f"{PLANT_ENV} must be a finite factor >= 1 (e.g. 1.3) or impl=factor,... with impl one "
                         f"of {', '.join(PLANTED_IMPLS)}, got {spec!r}")
    return f


def planted() -> dict:
    """``$BLOBBENCH_PLANT_SLOWDOWN`` as {fused op: factor} (empty when unset)."""
    spec = os.environ.get(PLANT_ENV, "").strip()
    if not spec:
        return {}
    if "=" not in spec:
        f = _factor(spec, spec)
        return {i: f for i in PLANTED_IMPLS} if f > 1 else {}
    out = {}
    for item in spec.split(","):
        impl, _, v = item.partition("=")
        if impl.strip() not in PLANTED_IMPLS:
            _factor("x", spec)   # raises, naming the variable and the ops
        out[impl.strip()] = _factor(v.strip(), spec)
    return {k: v for k, v in out.items() if v > 1}


def planted_slowdown() -> float:
    """The largest factor of ``$BLOBBENCH_PLANT_SLOWDOWN`` (1.0 when unset or empty)."""
    return max(planted().values(), default=1.0)


#: The clocks a measurement can be timed with: ``wall`` (``time.perf_counter``, the default) or
#: ``thread`` (``time.thread_time``: the CPU time of the calling thread, for one-thread CPU
#: measurements: time spent waiting for a CPU while other processes run is not counted, which on
#: a shared machine is most of the noise; the gate uses it).
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def timed_call(fn, x, inst, sync, plant: float = 1.0, clock=time.perf_counter) -> float:
    """Seconds of one forward + backward (``sync`` before and after) on ``clock``; with ``plant``
    > 1 the call is stretched to ``plant`` x its time by a busy-wait (on the same clock) inside
    the timed region."""
    sync()
    t0 = clock()
    forward_backward(fn, x, inst)
    sync()
    t = clock() - t0
    if plant > 1.0:
        end = t0 + t * plant
        while clock() < end:
            pass
        t = clock() - t0
    return t


def allocator_memory(fn, x, inst) -> dict:
    """Bytes the CPU allocator hands out during one forward + backward, counted from the
    profiler's allocation events (``torch.profiler``, ``profile_memory=True``), not the process's
    resident set: deterministic for deterministic code, whatever glibc does with its pages.

    ``alloc_peak_bytes``: the largest sum of live allocations made during the call (the gradient
    included); ``alloc_total_bytes``: all bytes allocated; ``alloc_count``: allocations.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    x.grad = None  # its free would otherwise fall inside the window
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        forward_backward(fn, x, inst)

    def walk(nodes):
        for n in nodes:
            yield n
            yield from walk(n.children)

    allocs = sorted((n for n in walk(prof.profiler.kineto_results.experimental_event_tree())
                     if n.typed[0] == _EventType.Allocation), key=lambda n: n.start_time_ns)
    cur = peak = total = count = 0
    for n in allocs:
        a = n.typed[1]
        if a.device.type != "cpu":
            continue
        cur += a.alloc_size
        peak = max(peak, cur)
        if a.alloc_size > 0:
            total += a.alloc_size
            count += 1
    return {"alloc_peak_bytes": int(peak), "alloc_total_bytes": int(total), "alloc_count": count}

#: loss -> (the paper's loop, the fused op, MONAI's loss without instances or None): what the check
#: compares (the fused op against the loop) and what the report puts side by side.
LOSSES = {
    "dice": ("naive", "fused", "monai_dice"),
    "tversky": ("naive_tversky", "fused_tversky", None),
    "dice_ce": ("naive_dice_ce", "fused_dice_ce", "monai_dice_ce"),
    "cc_dice_ce": ("naive_cc_dice_ce", "fused_cc_dice_ce", "monai_dice_ce"),
}


def _with_regions(loss):
    """``f(logits, instances)`` for a CC loss ``loss(logits, instances, regions)``: the Voronoi
    regions of an instance map are computed once (:func:`blobbench.voronoi_regions`, as a data
    pipeline would) and kept for later calls on the same tensor, outside the timed calls.
    ``f.prepare(instances)`` computes them ahead (the workers call it before measuring memory)."""
    import blobbench

    cache = {}

    def key(i):
        return (i.data_ptr(), tuple(i.shape), str(i.device), i.dtype)

    def prepare(i):
        if key(i) not in cache:
            cache.clear()   # one case per worker: keep one map, not every crop's
            cache[key(i)] = blobbench.voronoi_regions(i)
        return cache[key(i)]

    def f(x, i):
        return loss(x, i, prepare(i))

    f.prepare = prepare
    return f


def prepare(fn, instances) -> None:
    """What ``fn`` computes once per input outside its timed calls (the CC losses' regions).

    The heap is trimmed afterwards: the regions' temporaries (scipy's index arrays) would otherwise
    stay resident under the fixed trim threshold of :func:`_steady_malloc`, and the loss would
    reuse their pages, so the peak RSS of the measurement would not count the loss's memory."""
    if hasattr(fn, "prepare"):
        fn.prepare(instances)
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc


def loss_fn(impl: str):
    """``f(logits, instances) -> loss`` for an implementation name of :data:`IMPLEMENTATIONS`."""
    import blobbench

    if impl == "naive":
        return lambda x, i: blobbench.naive_blob_dice(x, i)
    if impl == "naive_tversky":
        return lambda x, i: blobbench.naive_blob_tversky(x, i)
    if impl == "vectorized":
        return lambda x, i: blobbench.vectorized_blob_loss(x, i)
    if impl == "fused":
        return lambda x, i: blobbench.blob_dice(x, i)
    if impl == "fused_tversky":
        return lambda x, i: blobbench.blob_tversky(x, i)
    if impl == "naive_dice_ce":
        return lambda x, i: blobbench.naive_blob_dice_ce(x, i)
    if impl == "fused_dice_ce":
        return lambda x, i: blobbench.blob_dice_ce(x, i)
    if impl == "naive_cc_dice_ce":
        return _with_regions(lambda x, i, r: blobbench.naive_cc_dice_ce(x, i, r))
    if impl == "vectorized_cc_dice_ce":
        return _with_regions(lambda x, i, r: blobbench.vectorized_cc_loss(x, i, r, loss="dice_ce"))
    if impl == "fused_cc_dice_ce":
        return _with_regions(lambda x, i, r: blobbench.cc_dice_ce(x, i, r))
    if impl == "monai_dice":
        from monai.losses import DiceLoss

        dice = DiceLoss(sigmoid=True)
        return lambda x, i: dice(x, (i > 0).to(x.dtype))
    if impl == "monai_dice_ce":
        from monai.losses import DiceCELoss

        dice_ce = DiceCELoss(sigmoid=True)
        return lambda x, i: dice_ce(x, (i > 0).to(x.dtype))
    raise ValueError(f"unknown implementation {impl!r}; choose from {sorted(IMPLEMENTATIONS)}")


# ----------------------------------------------------------------------------- devices

def normalize_device(spec) -> str:
    """``"cpu"``, or ``"cuda:N"`` with an explicit index, for ``cpu``, ``cuda``, ``cuda:N`` (or a
    ``torch.device``). ``cuda`` means the current CUDA device. Done once, where the devices enter
    (the command, the asv suites, the pytest-benchmark cases), so that every CUDA call downstream
    gets an indexed device (``torch.cuda.set_per_process_memory_fraction`` rejects a bare
    ``cuda``).

    Raises:
        ValueError: not cpu/cuda, no CUDA device or no CUDA kernels, or an index past the devices.
    """
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"not a device: {spec!r} (use cpu, cuda or cuda:N)") from e
    if dev.type == "cpu":
        return "cpu"
    if dev.type != "cuda":
        raise ValueError(f"unsupported device {spec!r}: use cpu, cuda or cuda:N")
    import blobbench

    if not torch.cuda.is_available():
        raise ValueError(f"device {spec!r}: no CUDA device is available")
    if not blobbench.has_cuda_kernels():
        raise ValueError(f"device {spec!r}: blobbench was built without the CUDA kernels")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if not 0 <= index < count:
        raise ValueError(f"device {spec!r}: there {'is' if count == 1 else 'are'} {count} CUDA "
                         f"device{'' if count == 1 else 's'} (cuda:0 ... cuda:{count - 1})")
    return f"cuda:{index}"


def normalize_devices(specs) -> list[str]:
    """:func:`normalize_device` of each, duplicates (``cuda`` and ``cuda:0``) dropped, order kept."""
    out = []
    for s in specs:
        d = normalize_device(s)
        if d not in out:
            out.append(d)
    return out


def devices_from_env(default="cpu,cuda", var="BLOBBENCH_DEVICES") -> list[str]:
    """The device names the asv suites and pytest-benchmark cases are parametrised over:
    ``$BLOBBENCH_DEVICES`` (comma separated, e.g. ``cpu,cuda:1``) or ``default``. Not
    normalised here (the parameter names must not depend on the machine); the suites normalise
    each in their setup."""
    return [d.strip() for d in os.environ.get(var, default).split(",") if d.strip()]


def synchronize(device) -> None:
    """Wait for ``device``'s queued work (CUDA); nothing on the CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def cuda_budget_fraction(base: int, budget: int, total: int) -> float:
    """The per-process memory fraction that lets the allocator hold ``budget`` bytes above the
    ``base`` bytes already allocated, on a device of ``total`` bytes (at most 1)."""
    return float(min(1.0, (base + budget) / total))


def cuda_memory_begin(device: torch.device, budget: int) -> int:
    """Start the memory accounting on a CUDA device (after the inputs exist): reset the peak,
    return the bytes allocated now (the base); with a ``budget`` (bytes, 0 = none) cap the
    allocator at base + budget, so that going past it raises torch's OutOfMemoryError."""
    if device.index is None:
        raise ValueError(f"cuda_memory_begin needs an indexed device, got {device}")
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    if budget:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(cuda_budget_fraction(base, budget, total), device)
    return int(base)


def cuda_memory_peak(device: torch.device, base: int) -> int:
    """Peak bytes allocated on ``device`` since :func:`cuda_memory_begin`, above its base."""
    return int(torch.cuda.max_memory_allocated(device) - base)


def forward_backward(fn, x, inst):
    """One training-step worth of loss work: forward, then backward into ``x.grad``."""
    x.grad = None
    fn(x, inst).backward()


@dataclass
class Case:
    """One input batch. ``kind``: profile, file, instances (sweep over N) or volume (sweep over V)."""
    name: str
    kind: str
    shape: tuple
    blobs: list            # instance count per crop
    path: str = ""         # where the (logits, instances) tensors are saved for the workers
    sweep_x: float = 0.0   # the swept quantity: instance count or voxels per crop
    meta: dict = field(default_factory=dict)

    def to_json(self):
        d = asdict(self)
        d.pop("path")
        d["shape"] = list(self.shape)
        return d


def _save_case(case: Case, logits, instances, workdir) -> Case:
    case.path = os.path.join(workdir, f"{len(os.listdir(workdir)):04d}-{case.name.replace('/', '_')}.pt")
    torch.save((logits, instances), case.path)
    case.shape = tuple(logits.shape)
    case.blobs = [int(torch.unique(instances[b]).numel() - int((instances[b] == 0).any()))
                  for b in range(instances.shape[0])]
    return case


def profile_case(profile: str, batch: int | None, seed: int, workdir) -> Case:
    from .synthetic import PROFILES, profile_batch

    p = PROFILES[profile]
    x, inst = profile_batch(p, seed=seed, batch=batch)
    return _save_case(Case(profile, "profile", (), [], meta={"profile": profile,
                                                              "description": p.description}),
                      x, inst, workdir)


def instances_case(n: int, crop, seed: int, workdir) -> Case:
    from .synthetic import grid_instances, logits_like

    inst = torch.from_numpy(grid_instances(crop, n, seed))[None, None]
    return _save_case(Case(f"N={n}", "instances", (), [], sweep_x=n, meta={"crop": list(crop)}),
                      logits_like(inst, seed), inst, workdir)


def volume_case(edge: int, n: int, seed: int, workdir) -> Case:
    from .synthetic import grid_instances, logits_like

    inst = torch.from_numpy(grid_instances((edge,) * 3, n, seed))[None, None]
    return _save_case(Case(f"{edge}^3", "volume", (), [], sweep_x=edge ** 3, meta={"instances": n}),
                      logits_like(inst, seed), inst, workdir)


def file_case(path, profile: str, crops: int | None, seed: int, workdir, key=None, volume=None) -> Case:
    """A case cut from a label file (``volume``: the file's array, when already loaded)."""
    from .labelfiles import crops_from_labels, load_label_volume
    from .synthetic import PROFILES, logits_like

    p = PROFILES[profile]
    vol = load_label_volume(path, key) if volume is None else volume
    inst = crops_from_labels(vol, p.crop, crops or p.crops, seed)
    name = os.path.basename(str(path))
    return _save_case(Case(name, "file", (), [], meta={"file": str(path), "volume_shape": list(vol.shape),
                                                       "profile": profile}),
                      logits_like(inst, seed), inst, workdir)


# ----------------------------------------------------------------------------- host cost proxy

PROXY_SHAPE = (1, 1, 4, 4, 4)


def host_cost_proxy(reps: int = 25, inner: int = 100, threads: int | None = 1) -> dict:
    """The per-call host cost of the fused op, measurable without a GPU (issue 10).

    On the CPU, forward + backward of ``blob_dice(x, inst, max_label=2)`` on a 1x1x4x4x4 float32
    input (int32 labels in 0..2) against ``x.sum().backward()`` on the same input: the work on 64
    voxels is nothing, so the ratio is the op's dispatch, autograd glue and allocations in units
    of the cheapest autograd call there is. ``reps`` interleaved repetitions (the order of the two
    alternates), each the mean of ``inner`` calls; ``ratio`` = median fused / median sum, with the
    quartiles and extremes of the per-repetition ratios as its spread. ``threads``: torch threads
    while measuring (None: leave as is); the previous setting is restored.
    """
    import statistics as st

    import blobbench

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(PROXY_SHAPE, generator=g).requires_grad_(True)
        inst = torch.randint(0, 3, PROXY_SHAPE, generator=g, dtype=torch.int32)

        def fused():
            x.grad = None
            blobbench.blob_dice(x, inst, max_label=2).backward()

        def plain():
            x.grad = None
            x.sum().backward()

        for _ in range(max(inner, 10)):  # warm-up: lazy init, allocator, dispatcher caches
            fused()
            plain()
        tf, tp, per_rep = [], [], []
        for r in range(reps):
            t = {}
            for f in ((fused, plain) if r % 2 == 0 else (plain, fused)):
                t0 = time.perf_counter()
                for _ in range(inner):
                    f()
                t[f] = (time.perf_counter() - t0) / inner
            tf.append(t[fused])
            tp.append(t[plain])
            per_rep.append(t[fused] / t[plain])
    finally:
        torch.set_num_threads(old)
    q = st.quantiles(per_rep, n=4) if len(per_rep) >= 2 else per_rep * 3
    ratio = st.median(tf) / st.median(tp)
    return {"ratio": ratio, "ratio_q1": q[0], "ratio_q3": q[2], "ratio_min": min(per_rep),
            "ratio_max": max(per_rep), "rel_iqr": (q[2] - q[0]) / ratio,
            "fused_median_s": st.median(tf), "sum_backward_median_s": st.median(tp),
            "ratios": per_rep, "reps": reps, "inner": inner, "threads": threads or old,
            "shape": list(PROXY_SHAPE), "what": "CPU, blob_dice(x, inst, max_label=2) fwd+bwd / x.sum().backward(), "
                                                 "float32 1x1x4x4x4, int32 labels 0..2"}


def _proxy_worker(conn, task):
    try:
        conn.send({"event": "done", "status": "ok",
                   "proxy": host_cost_proxy(task["reps"], task["inner"], task["threads"])})
    except BaseException as e:  # noqa: BLE001
        conn.send(_failure(e))
    finally:
        conn.close()


# ----------------------------------------------------------------------------- worker processes

def _vm(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _have_proc():
    return os.path.exists("/proc/self/clear_refs") and os.path.exists("/proc/self/status")


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    msg = str(e)
    return "can't allocate memory" in msg or "out of memory" in msg or "std::bad_alloc" in msg


def _tiny_inputs():
    inst = torch.zeros(1, 1, 8, 8, 8, dtype=torch.int32)
    inst[0, 0, 1:3, 1:3, 1:3] = 1
    inst[0, 0, 5:7, 4:7, 4:6] = 2
    return torch.randn(1, 1, 8, 8, 8), inst


def _steady_malloc():
    """Make glibc's allocator behave as in a long-running training process.

    A fresh process starts with glibc's small dynamic mmap/trim thresholds, so every large
    temporary of an ATen-op implementation is mmapped and unmapped (or the heap trimmed) on every
    call and its pages are faulted in again: a cost a training process, whose thresholds have
    long grown, does not pay. Fixing the thresholds at their ceiling removes that artefact; the
    peak RSS still counts every page touched.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)      # glibc's maximum on 64-bit
        libc.mallopt(M_TRIM_THRESHOLD, 256 * 2**20)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to adjust


def memory_begin(device: torch.device, budget: int) -> int:
    """Start the memory accounting of a measurement (after warm-up and inputs) and apply the memory
    budget (bytes above now, 0 = none). CPU: an address-space limit, the peak-RSS mark reset,
    the RSS as the base; CUDA: :func:`cuda_memory_begin` (needs an indexed device)."""
    if device.type == "cuda":
        return cuda_memory_begin(device, budget)
    if budget:
        _cap_address_space(budget)
    if _have_proc():
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
        return _vm("VmRSS")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_peak(device: torch.device, base: int) -> int:
    """Peak bytes above ``base`` since :func:`memory_begin`."""
    if device.type == "cuda":
        return cuda_memory_peak(device, base)
    return int((_vm("VmHWM") if _have_proc() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base)


def _worker_setup(task):
    """A fresh worker's malloc settings, threads and device; returns the device and its sync."""
    _steady_malloc()
    torch.set_num_threads(task["threads"])
    device = torch.device(normalize_device(task["device"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    return device, sync


def _worker(conn, task):
    """Runs in a fresh process: measures one (case, impl, device); sends dicts through ``conn``."""
    try:
        device, sync = _worker_setup(task)
        fn = loss_fn(task["impl"])
        x, inst = torch.load(task["path"])
        # Warm-up on a tiny input: thread pools, lazy imports, the CUDA context, kernel caches.
        xs, ins = _tiny_inputs()
        forward_backward(fn, xs.to(device).requires_grad_(True), ins.to(device))
        x = x.to(device).requires_grad_(True)
        inst = inst.to(device)
        prepare(fn, inst)
        sync()
        base = memory_begin(device, task["mem_budget_bytes"])
        conn.send({"event": "ready"})
        t0 = time.perf_counter()
        try:
            forward_backward(fn, x, inst)
            sync()
        except Exception as e:  # noqa: BLE001 - classified below
            if _is_oom(e):
                conn.send({"event": "done", "status": "out of memory", "error": str(e).splitlines()[0][:200]})
                return
            raise
        first = time.perf_counter() - t0
        peak = memory_peak(device, base)
        conn.send({"event": "first", "first_call_s": first, "peak_bytes": int(peak)})
        reps = task["reps"]
        n = reps if first * reps <= task["max_case_s"] else max(min(3, reps), int(task["max_case_s"] / first))
        plant = task.get("plant", {}).get(task["impl"], 1.0)
        times = [timed_call(fn, x, inst, sync, plant) for _ in range(n)]
        done = {"event": "done", "status": "ok", "times_s": times}
        if device.type == "cpu" and first <= task["max_case_s"]:   # the loop on a big case: too slow to profile
            # The memory budget held the measured calls; the profiler's own threads and buffers
            # are not the implementation's, so the address-space cap is lifted before counting.
            _uncap_address_space()
            done.update(allocator_memory(fn, x, inst))
        conn.send(done)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, never a silent crash
        conn.send(_failure(e))
    finally:
        conn.close()


def _group_worker(conn, task):
    """Runs in a fresh process: the implementations ``task["impls"]`` of one case, their timed
    repetitions interleaved (repetition r runs them in the order rotated by r), so that whatever
    slows the machine for a while slows all of them alike; then each one's allocator bytes."""
    try:
        device, sync = _worker_setup(task)
        impls = list(task["impls"])
        fns = {i: loss_fn(i) for i in impls}
        x, inst = torch.load(task["path"])
        xs, ins = _tiny_inputs()
        for i in impls:
            forward_backward(fns[i], xs.to(device).requires_grad_(True), ins.to(device))
        x = x.to(device).requires_grad_(True)
        inst = inst.to(device)
        for i in impls:
            prepare(fns[i], inst)
        conn.send({"event": "ready"})
        first = {}
        for i in impls:   # untimed first calls
            first[i] = timed_call(fns[i], x, inst, sync)
        conn.send({"event": "first", "first_call_s": first})
        slowest = max(first.values())
        reps = task["reps"]
        n = reps if slowest * len(impls) * reps <= task["max_case_s"] else max(
            min(3, reps), int(task["max_case_s"] / (slowest * len(impls))))
        plant = task.get("plant", {})
        clock = CLOCKS[task.get("clock", "wall")]
        times = {i: [] for i in impls}
        for r in range(n):
            k = r % len(impls)
            for i in impls[k:] + impls[:k]:
                times[i].append(timed_call(fns[i], x, inst, sync, plant.get(i, 1.0), clock))
        alloc = {}
        if device.type == "cpu" and task.get("allocator", True):
            alloc = {i: allocator_memory(fns[i], x, inst) for i in impls}
        conn.send({"event": "done", "status": "ok", "times_s": times, "alloc": alloc})
    except BaseException as e:  # noqa: BLE001 - reported to the parent, never a silent crash
        conn.send(_failure(e))
    finally:
        conn.close()


def _failure(e: BaseException) -> dict:
    """The message a worker sends for an exception: out of memory is a result; anything else is
    an error, sent with its whole traceback."""
    if _is_oom(e):
        return {"event": "done", "status": "out of memory", "error": str(e).splitlines()[0][:200]}
    return {"event": "done", "status": "error", "error": f"{type(e).__name__}: {e}".splitlines()[0][:300],
            "traceback": traceback.format_exc()}


def _mem_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 where unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cap_address_space(extra: int) -> None:
    """Limit this process's address space to its current size + ``extra`` bytes, so that going
    past it is a MemoryError (an "out of memory" result) rather than the kernel's OOM killer."""
    vm = _vm("VmSize") if _have_proc() else 0
    if not vm or extra <= 0:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _uncap_address_space() -> None:
    """Lifts :func:`_cap_address_space`'s limit (the soft limit back to the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))


def _check_worker(conn, task):
    """Fused (float32, every device) against the naive loop (float64, CPU), for each loss of
    ``task["losses"]`` (:data:`LOSSES`: dice, tversky, dice_ce): loss and gradient, one
    crop (batch element) at a time so that the loop's graph stays a crop's worth; the largest
    differences over the crops are reported. Without CUDA devices the process may use at most 80 %
    of the memory that was available when it started: beyond that the check is "out of memory",
    not killed."""
    try:
        torch.set_num_threads(task["threads"])
        x, inst = torch.load(task["path"])
        if not any(torch.device(d).type == "cuda" for d in task["devices"]):
            # not with CUDA: its context reserves far more address space than it uses
            _cap_address_space(int(0.8 * _mem_available()))
        out = {}
        for loss, (naive, fused, _) in LOSSES.items():
            if loss not in task["losses"]:
                continue
            for b in range(x.shape[0]):
                xb, ib = x[b:b + 1], inst[b:b + 1]
                xr = xb.detach().double().requires_grad_(True)
                ref = loss_fn(naive)(xr, ib)
                ref.backward()
                for dev in task["devices"]:
                    xf = xb.detach().to(dev, copy=True).requires_grad_(True)
                    got = loss_fn(fused)(xf, ib.to(dev))
                    got.backward()
                    g = xf.grad.double().cpu()
                    row = {"loss": got.item(), "loss_ref": ref.item(),
                           "loss_rel_diff": abs(got.item() - ref.item()) / max(abs(ref.item()), 1e-30),
                           "grad_max_abs_diff": float((g - xr.grad).abs().max()),
                           "grad_max_abs": float(xr.grad.abs().max()), "crops": 1}
                    prev = out.get(f"{loss}/{dev}")
                    if prev:   # the worst crop so far
                        row = {k: max(prev[k], row[k]) for k in ("loss_rel_diff", "grad_max_abs_diff",
                                                                  "grad_max_abs")} | {
                            "loss": prev["loss"], "loss_ref": prev["loss_ref"], "crops": prev["crops"] + 1}
                    out[f"{loss}/{dev}"] = row
                del xr, ref
        conn.send({"event": "done", "status": "ok", "checks": out})
    except BaseException as e:  # noqa: BLE001
        conn.send(_failure(e))
    finally:
        conn.close()


def _death(code) -> str:
    if code is not None and code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (on Linux usually the kernel's out-of-memory killer: see dmesg)" if name == "SIGKILL" else ""
        return f"the worker process was killed by {name}{hint}"
    return f"the worker process died (exit code {code})"


class Runner:
    """Starts the worker processes and enforces the budgets.

    Args:
        threads: CPU threads per worker (torch.set_num_threads).
        reps: timed repetitions per measurement (at most).
        max_case_s: fewer repetitions (at least 3) when ``reps`` would take longer than this.
        time_budget_s: a forward + backward taking longer than this is stopped: "over budget".
        mem_budget_bytes: peak memory above the inputs beyond this is "out of memory" (0: none).
    """

    def __init__(self, threads: int, reps: int, max_case_s: float, time_budget_s: float,
                 mem_budget_bytes: int):
        self.threads, self.reps, self.max_case_s = threads, reps, max_case_s
        self.time_budget_s, self.mem_budget_bytes = time_budget_s, mem_budget_bytes
        self.plant = planted()
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")   # torch.profiler's start/stop chatter (torch 2.14 prints it at 5)
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(["blobbench.bench.bench", "monai.losses", "torch.profiler"])

    def _run(self, target, task, timeouts):
        parent, child = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=target, args=(child, task), daemon=True)
        proc.start()
        child.close()
        msgs = {}
        died = False
        try:
            for event, timeout in timeouts:
                while True:
                    if not parent.poll(timeout):
                        return msgs, event  # timed out waiting for this event
                    msg = parent.recv()
                    msgs.update(msg)
                    if msg["event"] in (event, "done"):
                        break
                if msgs.get("event") == "done":
                    return msgs, None
            return msgs, None
        except EOFError:
            died = True
            return msgs, None
        finally:
            if proc.is_alive():
                proc.kill()
            proc.join()
            if died:
                msgs["status"] = "error"
                msgs["exitcode"] = proc.exitcode
                msgs.setdefault("error", _death(proc.exitcode))
            elif "status" not in msgs and proc.exitcode not in (0, None):
                msgs["exitcode"] = proc.exitcode

    def measure(self, case: Case, impl: str, device: str) -> dict:
        task = {"path": case.path, "impl": impl, "device": device, "threads": self.threads,
                "reps": self.reps, "max_case_s": self.max_case_s,
                "mem_budget_bytes": self.mem_budget_bytes, "plant": self.plant}
        budget = self.time_budget_s
        load_before = load()
        msgs, timed_out = self._run(_worker, task, [
            ("ready", 300.0),                                             # start-up and warm-up
            ("first", budget),                                            # one call within budget
            ("done", budget * max(self.reps, 1) + self.max_case_s + 30.0),
        ])
        res = {"case": case.name, "kind": case.kind, "impl": impl, "device": device, "load": load_before}
        if timed_out == "first":
            res.update(status="over budget", error=f"one forward+backward took over {budget:g} s")
            return res
        if timed_out:
            res.update(status="error", error=f"no '{timed_out}' from the worker in time")
            return res
        res["status"] = msgs.get("status", "error")
        for k in ("error", "traceback", "first_call_s", "peak_bytes", "exitcode", "alloc_peak_bytes",
                  "alloc_total_bytes", "alloc_count"):
            if k in msgs:
                res[k] = msgs[k]
        if impl in self.plant:
            res["planted_slowdown"] = self.plant[impl]
        if res["status"] == "error" and "error" not in res:
            res["error"] = f"worker exited with code {msgs.get('exitcode')}"
        times = msgs.get("times_s")
        if res["status"] == "ok" and times:
            res.update(times_s=times, **summarize_times(times))
        if res["status"] == "ok" and not times:
            res.update(status="error", error="the worker reported no timed repetition")
        return res

    def measure_group(self, case: Case, impls, device: str, reps: int | None = None,
                      allocator: bool = True, clock: str = "wall") -> list[dict]:
        """The implementations ``impls`` of ``case`` in one process, their repetitions interleaved
        (:func:`_group_worker`): one measurement per implementation, each with ``"interleaved"``
        (the group; repetition i of each ran within the same round) and, on the CPU, its allocator
        bytes. No peak RSS (one process runs them all). ``clock``: ``wall``, or ``thread`` (CPU
        time of the one thread: only on the CPU with one thread; else wall)."""
        impls = list(impls)
        clock = "thread" if clock == "thread" and device == "cpu" and self.threads == 1 else "wall"
        reps = self.reps if reps is None else reps
        task = {"path": case.path, "impls": impls, "device": device, "threads": self.threads, "reps": reps,
                "max_case_s": self.max_case_s * len(impls), "plant": self.plant, "allocator": allocator,
                "clock": clock}
        budget = self.time_budget_s * len(impls)
        load_before = load()
        msgs, timed_out = self._run(_group_worker, task, [
            ("ready", 300.0), ("first", budget), ("done", budget * max(reps, 1) + task["max_case_s"] + 60.0)])
        out = []
        for impl in impls:
            res = {"case": case.name, "kind": case.kind, "impl": impl, "device": device, "load": load_before,
                   "interleaved": impls, "clock": clock}
            if timed_out:
                res.update(status="over budget" if timed_out == "first" else "error",
                           error=f"no '{timed_out}' from the interleaved worker in time")
            else:
                res["status"] = msgs.get("status", "error")
                for k in ("error", "traceback", "exitcode"):
                    if k in msgs:
                        res[k] = msgs[k]
                if res["status"] == "ok":
                    times = msgs["times_s"][impl]
                    res.update(first_call_s=msgs["first_call_s"][impl], times_s=times, **summarize_times(times))
                    res.update(msgs.get("alloc", {}).get(impl, {}))
                    if "alloc_peak_bytes" in res:   # one process for all: its RSS is no one's own
                        res.update(peak_bytes=res["alloc_peak_bytes"], memory_basis="allocator")
            if impl in self.plant:
                res["planted_slowdown"] = self.plant[impl]
            out.append(res)
        return out

    def proxy(self, reps: int = 25, inner: int = 100) -> dict:
        """:func:`host_cost_proxy` in a fresh process, one thread."""
        msgs, timed_out = self._run(_proxy_worker, {"reps": reps, "inner": inner, "threads": 1},
                                    [("done", 300.0)])
        if timed_out:
            return {"status": "error", "error": "the host cost proxy took over 300 s"}
        out = {k: v for k, v in msgs.items() if k not in ("event", "proxy")}
        out.update(msgs.get("proxy", {}))
        out.setdefault("status", "error")
        return out

    def check(self, case: Case, devices, losses=("dice",)) -> dict:
        task = {"path": case.path, "devices": list(devices), "threads": self.threads, "losses": list(losses)}
        msgs, timed_out = self._run(_check_worker, task, [("done", 300.0 + 4 * self.time_budget_s)])
        if timed_out:
            return {"status": "over budget", "error": "the float64 naive loop took too long"}
        return {k: v for k, v in msgs.items() if k != "event"}
