"""One side of ``blobbench ab``: a long-lived process that imports blobbench from ONE tree (the base
revision's or the working tree's) and times single calls on command.

Two builds of the ``blob`` op namespace cannot live in one process, so ``blobbench ab`` starts two
of these, base and head, and alternates their repetitions. This file is run by path
(:func:`blobbench.bench.ab.Side`), never imported from the tree under test: it depends on torch
and on blobbench's public functions only (``blob_dice``, ``blob_tversky``, ``blob_dice_ce``), so
that an older base revision can be measured by the head's harness.

Protocol: one JSON object per line on stdin, one answer per line on the original stdout (the
worker's own ``print``s and library chatter go to stderr):

- ``{"cmd": "init", "tree": PATH, "threads": 1, "plant": {impl: factor}, "cpu": N or null}`` (``cpu``:
  the one CPU this process may run on) ->
  ``{"ok": true, "blobbench": FILE, "extension": FILE, "torch": VERSION}``
- ``{"cmd": "load", "case": NAME, "path": FILE, "impls": [...]}``: the case's tensors, a warm-up
  (a tiny input, then ``warmup`` (3) untimed calls per implementation) -> ``{"ok": true}``
- ``{"cmd": "time", "case": NAME, "impl": IMPL}``: one forward + backward timed by the thread's
  CPU time (``time.thread_time``), with a planted slowdown where ``plant`` names the op ->
  ``{"ok": true, "t": SECONDS}``
- ``{"cmd": "memory", "case": NAME, "impl": IMPL}``: the bytes the CPU allocator hands out during
  one call (torch.profiler's allocation events) -> ``{"ok": true, "alloc_peak_bytes": ...}``
- ``{"cmd": "quit"}``

A failing command answers ``{"ok": false, "error": ..., "traceback": ...}`` and the worker goes on.
"""
import json
import os
import sys
import time
import traceback


def _loss(impl):
    import blobbench

    name = {"fused": "blob_dice", "fused_tversky": "blob_tversky", "fused_dice_ce": "blob_dice_ce"}.get(impl)
    if name is None:
        raise ValueError(f"blobbench ab measures fused, fused_tversky, fused_dice_ce; got {impl!r}")
    fn = getattr(blobbench, name, None)
    if fn is None:
        raise ValueError(f"this tree's blobbench has no {name} ({impl})")
    return lambda x, i: fn(x, i)


def _call(fn, x, inst):
    x.grad = None
    fn(x, inst).backward()


def _timed(fn, x, inst, plant=1.0):
    t0 = time.thread_time()
    _call(fn, x, inst)
    t = time.thread_time() - t0
    if plant > 1.0:   # test only: busy-wait (plant - 1) x the call's own time, on the same clock
        end = t0 + t * plant
        while time.thread_time() < end:
            pass
        t = time.thread_time() - t0
    return t


def _allocator_bytes(fn, x, inst):
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    x.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _call(fn, x, inst)

    def walk(nodes):
        for n in nodes:
            yield n
            yield from walk(n.children)

    allocs = sorted((n for n in walk(prof.profiler.kineto_results.experimental_event_tree())
                     if n.typed[0] == _EventType.Allocation), key=lambda n: n.start_time_ns)
    cur = peak = total = 0
    for n in allocs:
        a = n.typed[1]
        if a.device.type != "cpu":
            continue
        cur += a.alloc_size
        peak = max(peak, cur)
        total += max(a.alloc_size, 0)
    return {"alloc_peak_bytes": int(peak), "alloc_total_bytes": int(total)}


def _steady_malloc():
    """glibc's thresholds as in a long-running process (as the gate's workers set them): large
    temporaries are not mmapped and unmapped, nor the heap trimmed, on every call."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 2**20)     # M_MMAP_THRESHOLD, glibc's maximum on 64-bit
        libc.mallopt(-1, 256 * 2**20)    # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def main():
    _steady_malloc()
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                 # whatever else writes to stdout lands in the log, not the protocol
    sys.stdout = sys.stderr
    state = {"plant": {}, "cases": {}, "fns": {}}
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            cmd = msg["cmd"]
            if cmd == "quit":
                break
            if cmd == "init":
                tree = os.path.realpath(msg["tree"])
                if msg.get("cpu") is not None:    # both sides on the same CPU: the same neighbours and caches
                    os.sched_setaffinity(0, {msg["cpu"]})
                sys.path.insert(0, tree)
                import torch

                torch.set_num_threads(msg.get("threads", 1))
                import blobbench

                got = os.path.realpath(blobbench.__file__)
                if not got.startswith(tree + os.sep):
                    raise RuntimeError(f"imported blobbench from {got}, not from the tree {tree}")
                ext = sys.modules.get("blobbench._C")
                state["plant"] = {k: float(v) for k, v in (msg.get("plant") or {}).items()}
                ans = {"blobbench": got, "extension": getattr(ext, "__file__", None), "torch": torch.__version__,
                       "threads": torch.get_num_threads()}
            elif cmd == "load":
                import torch

                x, inst = torch.load(msg["path"])
                x = x.requires_grad_(True)
                xs = torch.randn(1, 1, 8, 8, 8, requires_grad=True)
                ins = torch.zeros(1, 1, 8, 8, 8, dtype=torch.int32)
                ins[0, 0, 1:3, 1:3, 1:3] = 1
                ins[0, 0, 5:7, 4:7, 4:6] = 2
                for impl in msg["impls"]:
                    fn = state["fns"].get(impl) or _loss(impl)
                    state["fns"][impl] = fn
                    _call(fn, xs, ins)      # warm-up: lazy init, thread pools, allocator
                    for _ in range(msg.get("warmup", 3)):
                        _call(fn, x, inst)  # untimed calls on the case: its allocations reach their steady state
                state["cases"][msg["case"]] = (x, inst)
                ans = {}
            elif cmd == "time":
                x, inst = state["cases"][msg["case"]]
                impl = msg["impl"]
                ans = {"t": _timed(state["fns"][impl], x, inst, state["plant"].get(impl, 1.0))}
            elif cmd == "memory":
                x, inst = state["cases"][msg["case"]]
                ans = _allocator_bytes(state["fns"][msg["impl"]], x, inst)
            else:
                raise ValueError(f"unknown command {cmd!r}")
            out.write(json.dumps({"ok": True} | ans) + "\n")
        except Exception as e:  # noqa: BLE001 - reported to the parent, which decides
            out.write(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300],
                                  "traceback": traceback.format_exc()}) + "\n")


if __name__ == "__main__":
    main()
