"""Where the over-memory decode's peak RSS comes from: the streaming benchmark's capped child,
run without a cap, with a thread sampling the process's memory every millisecond.

    python -m benchmarks.rss_trace --workdir DIR [--hidden 4096 --intermediate 1024 --top-k 10 ...]

Prints, at each event (model steps, record arrays allocated, reads into the expert cache), the resident memory split into
anonymous / file-backed / shared pages (``/proc/self/status``) and MLX's active and cached
bytes, then the peak of each between two events. The peak's interval names what raised it; the
growth of each kind of mapping (``/proc/self/smaps``) from load to the end names what holds it.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple

import mlx.core as mx

from . import measure as M
from .memcap import RSS_PARTS, status_fields
from .streaming import load_capped, peak_rss, start_gpu_runtime
from .synthetic import Shape, ensure_models


def mappings() -> Dict[str, List[int]]:
    """Resident KiB by mapping kind, from ``/proc/self/smaps``: [Rss, Anonymous, mappings] per file
    path, per ``[heap]`` / ``[stack]``-like name, and for unnamed mappings per size (thread stacks,
    a runtime's pools and a library's buffers each come in sizes of their own)."""
    out: Dict[str, List[int]] = {}
    key = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
                lo, hi = (int(v, 16) for v in head[0].split("-"))
                key = head[5] if len(head) > 5 else f"(unnamed, {(hi - lo) >> 10} KiB each)"
                out.setdefault(key, [0, 0, 0])[2] += 1
            elif head[0] in ("Rss:", "Anonymous:"):
                out[key][0 if head[0] == "Rss:" else 1] += int(head[1])
    return out


def mapping_growth(before: Dict[str, List[int]], after: Dict[str, List[int]], top: int = 12) -> List[str]:
    """Lines for the mapping kinds whose resident memory grew most between two ``mappings()``."""
    rows = []
    for key, (rss, anon, n) in after.items():
        b = before.get(key, [0, 0, 0])
        rows.append((rss - b[0], anon - b[1], n - b[2], n, key))
    rows.sort(reverse=True)
    return [f"{d_rss / 1024:+8.1f} {d_anon / 1024:+8.1f} {d_n:+4d} {n:5d}  {key}" for d_rss, d_anon, d_n, n, key in rows[:top]]


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def malloc_heap() -> str:
    """glibc's own account of its heap (``mallinfo2``): bytes taken from the system, in use, free."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return "malloc: no mallinfo2 (not glibc 2.33+)"
    m = libc.mallinfo2()
    return (f"malloc: main heap {m.arena / 1e6:.1f} MB (in use {m.uordblks / 1e6:.1f}, free {m.fordblks / 1e6:.1f}), "
            f"mmapped blocks {m.hblkhd / 1e6:.1f} MB")


def sample() -> Tuple[int, ...]:
    """(anon, file, shmem) resident bytes of this process."""
    return tuple(kb * 1024 for kb in status_fields(RSS_PARTS).values())


class Sampler(threading.Thread):
    """Samples every ``period`` seconds; ``mark(label)`` starts a new interval."""

    def __init__(self, period: float = 0.001):
        super().__init__(daemon=True)
        self.period, self.stop = period, threading.Event()
        self.intervals: List[list] = []  # [label, at-start sample, peak sample, mlx active, mlx cache]
        self.mark("start")

    def mark(self, label: str) -> None:
        now = sample()
        self.intervals.append([label, now, now, mx.get_active_memory(), mx.get_cache_memory()])

    def run(self) -> None:
        while not self.stop.is_set():
            s = sample()
            cur = self.intervals[-1]
            if sum(s) > sum(cur[2]):
                cur[2] = s
            time.sleep(self.period)


def mb(x: int) -> str:
    return f"{x / 1e6:7.0f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=os.environ.get("FLASH_MOE_BENCH_DIR", "/tmp/flash-moe-bench"))
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--dtype", default=None)
    p.add_argument("--tokens", type=int, default=6)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--cache-bytes", type=int, default=64 << 20, help="the child's expert cache and largest read")
    p.add_argument("--models", type=int, default=1, help="load and decode this many times in turn, to tell "
                   "memory each model holds from memory the process keeps once")
    p.add_argument("--build-only", action="store_true", help="build the models and exit (the build's memory "
                   "would otherwise stay in this process's figures)")
    args = p.parse_args(argv)

    if "torch" not in sys.modules:  # as the benchmark's child: the tokenizer stack would pull it in
        sys.modules["torch"] = None
    from flash_moe.io import records

    cpu = mx.default_device().type == mx.cpu
    shape = Shape(hidden=args.hidden, intermediate=args.intermediate, experts=args.experts, layers=args.layers,
                  top_k=args.top_k, dtype=args.dtype or ("float32" if cpu else "bfloat16"))
    packed = ensure_models(shape, Path(args.workdir), print)["packed"]
    if args.build_only:
        return 0

    sampler = Sampler()
    init = records.RecordArrays.__init__

    def logged_init(self, layout, rows, on_host=False):
        sampler.mark(f"RecordArrays rows={rows} on_host={on_host}")
        init(self, layout, rows, on_host)
        sampler.mark(f"  allocated ({rows * layout.record_size / 1e6:.0f} MB)")

    records.RecordArrays.__init__ = logged_init
    sampler.start()
    mx.set_cache_limit(args.cache_bytes // 2)
    if not cpu:  # as the benchmark's child does (start_gpu_runtime)
        sampler.mark("GPU runtime: the model's decode once")
        start_gpu_runtime(packed, args.threads, args.cache_bytes)
    heaps = []
    for run in range(args.models):
        sampler.mark("load" if run == 0 else f"load again ({run + 1} of {args.models})")
        model = load_capped(packed, args.threads, args.cache_bytes)
        sampler.mark("loaded")
        if run == 0:
            at_load = mappings()
            call = type(model).__call__
            step = [0]

            def logged_call(self, inputs, *a, **kw):
                sampler.mark(f"step {step[0]} ({inputs.shape[1]} tokens)")
                step[0] += 1
                return call(self, inputs, *a, **kw)

            type(model).__call__ = logged_call
        heaps.append(f"loaded ({run + 1}):  {malloc_heap()}")
        step[0] = 0
        reader = model.expert_reader
        read = reader.read

        def logged_read(layer, experts, into=None, *a, _read=read, **kw):  # reads into the expert cache's slots
            sampler.mark(f"  read into cache: layer {layer}, {len(experts)} records")
            return _read(layer, experts, into, *a, **kw)

        reader.read = logged_read
        r = M.decode(model, model.make_cache, M.prompt_ids(8), args.tokens, model.expert_reader,
                     before=model.expert_reader.drop_page_cache)
        sampler.mark("decoded")
        heaps.append(f"decoded ({run + 1}): {malloc_heap()}")
        if run + 1 < args.models:
            del model, reader, read, logged_read
            gc.collect()
            mx.clear_cache()
    time.sleep(0.01)
    sampler.stop.set()
    sampler.join()

    print(f"{r['tok_s']:.2f} tok/s; {mx.default_device()}; MB:")
    print(f"{'interval':42} {'start anon/file/shmem':>24} {'peak anon/file/shmem':>24} {'peak':>7} "
          f"{'mlx act':>7} {'cache':>7}")
    for label, start, peak, active, cached in sampler.intervals:
        print(f"{label[:42]:42} {mb(start[0])}{mb(start[1])}{mb(start[2])}   {mb(peak[0])}{mb(peak[1])}{mb(peak[2])} "
              f"{mb(sum(peak))} {mb(active)} {mb(cached)}")
    top = max(sampler.intervals, key=lambda iv: sum(iv[2]))
    print(f"highest peak {sum(top[2]) / 1e6:.0f} MB in interval {top[0]!r}; VmHWM {peak_rss() / 1e6:.0f} MB")
    print("growth from loaded to decoded, by mapping kind (/proc/self/smaps): MB resident, MB anonymous, "
          "mappings added, mappings")
    print("\n".join(mapping_growth(at_load, mappings())))
    print("\n".join(heaps))
    try:  # what of it glibc can hand back: freed memory it kept, or none (all of it in use)
        ctypes.CDLL(None).malloc_trim(0)
        print(f"after malloc_trim(0): {malloc_heap()}; anon {status_fields(RSS_PARTS)['RssAnon'] / 1024:.0f} MB")
    except (OSError, AttributeError):
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
