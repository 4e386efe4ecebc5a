"""The streaming benchmark (issue 3): one command, one table, ratios measured side by side.

    python -m benchmarks.streaming [--workdir DIR] [--quick]      (also: flash-moe bench)

Builds (once, cached in the work dir) a random Qwen3.5-MoE with realistic 4-bit expert records,
then measures: the raw disk ceiling, cold / warm / RAM-cached decode against the same model
resident in mlx-lm, decode under a memory cgroup at 1/3 of the model, and prefill reads.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import List

import mlx.core as mx

from . import measure as M
from .memcap import child_argv, own_usage, run_capped, status_kb
from .synthetic import Shape, ensure_models

THREADS = (1, 2, 4, 8, 16)


def machine() -> str:
    dev = mx.default_device()
    name = ""
    try:
        name = mx.device_info().get("device_name", "") if dev.type == mx.gpu else ""
    except Exception:
        pass
    cpu = platform.processor() or platform.machine()
    return (f"{platform.node()} | {os.cpu_count()} cpus {cpu} | "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB | "
            f"mlx {mx.__version__} {dev}{' ' + name if name else ''}")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """This process's peak RSS since exec (VmHWM; ``ru_maxrss`` would include the forked parent's)."""
    return (status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class Table:
    """Rows of (section, figure, value, runs, target, verdict), printed as one table."""

    def __init__(self):
        self.rows: List[tuple] = []

    def add(self, section: str, figure: str, value: str, runs: str = "", target: str = "", ok=None) -> None:
        verdict = "" if ok is None else ("MET" if ok else "MISSED")
        self.rows.append((section, figure, value, runs, target, verdict))
        print(f"  [{section}] {figure}: {value} {target} {verdict}", file=sys.stderr, flush=True)

    def render(self) -> str:
        head = ("section", "figure", "value", "runs", "target", "")
        w = [max(len(str(r[i])) for r in self.rows + [head]) for i in range(6)]
        line = lambda r: " | ".join(str(c).ljust(w[i]) for i, c in enumerate(r)).rstrip()
        return "\n".join([line(head), "-+-".join("-" * x for x in w)] + [line(r) for r in self.rows])


def load_capped(packed: Path, threads: int, cache_bytes: int):
    """The over-memory child's model: an expert cache and a largest read of ``cache_bytes``."""
    import flash_moe

    model, _ = flash_moe.load(packed, threads=threads, cache_bytes=cache_bytes, max_read_bytes=cache_bytes,
                              check="never")
    return model


def start_gpu_runtime(packed: Path, threads: int, cache_bytes: int) -> None:
    """Run the over-memory child's decode (8-token prompt, 2 tokens) on the model once and free it.

    The GPU runtime maps its libraries, loads the kernels for the shapes it meets and allocates
    its host-side state at the first forward pass: ~0.9 GB of host memory on an H100 with MLX
    CUDA 0.32.4. Part of it only appears at the model's own shapes: a small model of the same
    sizes with 30 experts and 4 layers left ~52 MB of the main heap to the real model's first
    step (live allocations by glibc's count, made once per process: a second model's decode
    adds none; ``python -m benchmarks.rss_trace --models 2``, H200, session 14). Started this
    way before the measured load, all of it is in the footprint measured after load instead of
    a constant in the bound.
    """
    import gc

    model = load_capped(packed, threads, cache_bytes)
    M.decode(model, model.make_cache, M.prompt_ids(8), 2)
    del model
    gc.collect()
    mx.clear_cache()


def overmem_child(args) -> None:
    """Runs inside the memory cgroup: load, drop the page cache, decode, print one JSON line."""
    # flash-moe does not use torch, but where it is installed the tokenizer's transformers import
    # pulls it in: ~500 MB of RSS that belongs to no part of the measurement. Hide it.
    if "torch" not in sys.modules:
        sys.modules["torch"] = None
    importlib.import_module("flash_moe")  # the "imported" stage below includes it

    # Progress on stderr: if the cap kills the child, the parent shows how far it got.
    stage = lambda name: print(f"[overmem child] {name}: {own_usage()}", file=sys.stderr, flush=True)
    stage("imported")
    # MLX keeps freed buffers for reuse; under a cap that cache must be bounded like any other.
    mx.set_cache_limit(args.cache_bytes // 2)
    base = rss()
    if args.warmup_packed:
        start_gpu_runtime(Path(args.warmup_packed), args.threads, args.cache_bytes)
        stage("GPU runtime started (the model decoded once)")
    runtime = rss() - base
    model = load_capped(args.packed, args.threads, args.cache_bytes)
    if args.prefetch:
        model.set_prefetch(True)
    loaded = rss()
    stage("loaded")
    reader = model.expert_reader
    r = M.decode(model, model.make_cache, M.prompt_ids(8), args.tokens, reader, before=reader.drop_page_cache)
    stage("decoded")
    r.update(rss_import=base, rss_runtime=runtime, rss_loaded=loaded, peak_rss=peak_rss())
    print(json.dumps(r))


def run(args) -> str:
    import flash_moe
    from flash_moe.io.format import load_manifest
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    cpu = mx.default_device().type == mx.cpu
    shape = Shape(hidden=args.hidden, intermediate=args.intermediate, experts=args.experts, layers=args.layers,
                  top_k=args.top_k, dtype=args.dtype or ("float32" if cpu else "bfloat16"))
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    t_start = time.perf_counter()
    paths = ensure_models(shape, Path(args.workdir), log)
    packed = paths["packed"]
    files = M.expert_files(packed)
    t = Table()
    manifest = load_manifest(packed)
    rec = manifest.layout.record_size
    expert_bytes = sum(f.stat().st_size for f in files)
    resident_bytes = sum((packed / n).stat().st_size for n in manifest.resident_files)
    runs, n_tok = args.runs, args.tokens
    # Rows with nothing read from disk are fast and noisy (on the GPU host a 6-token run
    # ranged 0.3-1.3x of the median): they get more tokens and runs than the I/O-bound rows.
    mem_runs, mem_tok = max(runs, 3), max(n_tok, 24)
    t.add("model", "shape", f"{shape.key}: record {rec / 1e6:.2f} MB, experts {expert_bytes / 1e9:.2f} GB "
          f"({len(files)} layers x {shape.experts}), resident {resident_bytes / 1e6:.0f} MB, k={shape.top_k}")
    drop = lambda: M.drop_page_cache(files)

    # 1. raw disk ceiling
    import numpy as np
    rng = np.random.default_rng(0)
    all_recs = [(f, e) for f in range(len(files)) for e in range(shape.experts)]
    n_recs = min(len(all_recs), max(32, int(args.raw_bytes // rec)))
    sample = [all_recs[i] for i in rng.choice(len(all_recs), n_recs, replace=False)]
    raw = {}
    for th in THREADS:
        raw[th] = sorted(M.raw_read_gbps(files, rec, sample, th) for _ in range(runs))[runs // 2]
    t.add("raw disk", "pread GB/s, page cache dropped (1/2/4/8/16 threads)",
          " / ".join(f"{raw[th]:.2f}" for th in THREADS), f"{runs} x {n_recs} records")
    bw = raw[min(THREADS, key=lambda th: abs(th - args.threads))]
    h2d = M.host_to_device_gbps(shape.top_k * rec, runs=max(5, runs))
    h2d_host = M.host_to_device_gbps(shape.top_k * rec, runs=max(5, runs), on_host=True)
    t.add("raw disk", "one thread's CPU writes into an MLX array, then read by the device, GB/s (k records): "
          "default / kept on the host (the read buffers)", f"{h2d:.2f} / {h2d_host:.2f}", f"median of {max(5, runs)}")

    # 2. resident mlx-lm: the ceiling
    ref, _ = load_model(paths["mlx_lm"])
    prompt = M.prompt_ids(8)
    M.decode(ref, lambda: make_prompt_cache(ref), prompt, 2)  # warm-up (kernel setup)
    res = M.median_runs(lambda: M.decode(ref, lambda: make_prompt_cache(ref), prompt, mem_tok), mem_runs)
    t.add("resident", "mlx-lm resident tok/s (ms/token)", f"{res['tok_s']:.2f} ({res['s_tok'] * 1e3:.1f})",
          f"{mem_runs} x {mem_tok} tok")

    # 3. flash-moe streaming: warm (page cache), RAM cache, cold
    def flash(**kw):
        model, _ = flash_moe.load(packed, threads=args.threads, **kw)
        reader = model.expert_reader
        for layer in manifest.moe_layers:  # first reads check every CRC once, outside the timings
            for e0 in range(0, shape.experts, 64):
                reader.read(layer, range(e0, min(e0 + 64, shape.experts)))
        return model, reader

    def decode_row(label, model, reader, before=None, warmup=2, in_memory=False):
        tokens, n_runs = (mem_tok, mem_runs) if in_memory else (n_tok, runs)
        M.decode(model, model.make_cache, prompt, warmup, reader)
        r = M.median_runs(lambda: M.decode(model, model.make_cache, prompt, tokens, reader, before), n_runs)
        return r

    model, reader = flash()
    M.warm_page_cache(files)
    warm = decode_row("warm", model, reader)
    ratio = warm["tok_s"] / res["tok_s"]
    t.add("warm", "page cache: tok/s, vs resident", f"{warm['tok_s']:.2f}, {ratio:.2f}x "
          f"(io {warm['io_s_tok'] * 1e3:.1f} ms + compute {warm['compute_s_tok'] * 1e3:.1f} ms /tok)",
          f"{runs} x {n_tok} tok", ">= 0.80x", ratio >= 0.8)
    if not cpu:  # on a discrete GPU every streamed byte also crosses to device memory, however warm
        t.add("warm", "streamed bytes per second (bytes per token / time per token), GB/s",
              f"{warm['bytes_tok'] / warm['s_tok'] / 1e9:.2f} (one-thread CPU-write-to-device: {h2d_host:.2f})")

    cold = decode_row("cold", model, reader, before=drop)
    io_bound = bw / cold["bytes_tok"] * 1e9
    serial = cold["bytes_tok"] / (bw * 1e9) + res["s_tok"]
    t.add("cold", "tok/s; MB/token; I/O ms; compute ms",
          f"{cold['tok_s']:.2f}; {cold['bytes_tok'] / 1e6:.1f}; {cold['io_s_tok'] * 1e3:.1f}; "
          f"{cold['compute_s_tok'] * 1e3:.1f}", f"{runs} x {n_tok} tok, cache dropped per run")
    t.add("cold", "tok/s / I/O bound (raw BW / bytes per token)", f"{cold['tok_s'] / io_bound:.2f} "
          f"(bound {io_bound:.2f} tok/s at {bw:.2f} GB/s, {args.threads} threads)")
    t.add("cold", "time/token / serial bound (bytes/BW + resident compute)",
          f"{cold['s_tok'] / serial:.2f}x ({cold['s_tok'] * 1e3:.1f} vs {serial * 1e3:.1f} ms)", "",
          "<= 1.15x; < 1 beats it", cold["s_tok"] / serial <= 1.15)

    # The same without computing experts as their records land (all k read, then computed).
    chunks = [block.read_chunks for block in model.moe_blocks()]
    for block in model.moe_blocks():
        block.read_chunks = 1
    serial_run = decode_row("cold, no overlap", model, reader, before=drop)
    for block, n in zip(model.moe_blocks(), chunks):
        block.read_chunks = n
    t.add("cold", "experts computed only after all k reads: time/token / serial bound; in-layer overlap gain",
          f"{serial_run['s_tok'] / serial:.2f}x ({serial_run['tok_s']:.2f} tok/s); "
          f"overlap {serial_run['s_tok'] / cold['s_tok']:.2f}x faster", f"{runs} x {n_tok} tok")

    if args.prefetch_compare:
        model.set_prefetch(True)
        pw = decode_row("warm+prefetch", model, reader)
        pc = decode_row("cold+prefetch", model, reader, before=drop)
        acc = model.prefetch_accuracy()
        t.add("prefetch", "next-layer prediction: recall of true experts", f"{acc:.0%}")
        t.add("prefetch", "cold: time/token / serial bound", f"{pc['s_tok'] / serial:.2f}x "
              f"({pc['tok_s']:.2f} tok/s, {pc['bytes_tok'] / 1e6:.1f} MB/tok requested; prefetch is extra)", "",
              "< 1 beats it", pc["s_tok"] / serial < 1)
        t.add("prefetch", "warm: tok/s vs resident", f"{pw['tok_s'] / res['tok_s']:.2f}x")
        model.set_prefetch(False)
    del model, reader

    cmodel, creader = flash(cache_bytes=expert_bytes + rec)
    source = cmodel.expert_source
    M.fill_expert_cache(cmodel)  # the working set in the cache: here, every expert
    cached = decode_row("cached", cmodel, creader, in_memory=True)
    ratio = cached["tok_s"] / res["tok_s"]
    t.add("expert cache", "LRU slots in device memory holding the working set: tok/s, vs resident, hit rate",
          f"{cached['tok_s']:.2f}, {ratio:.2f}x, {cached['hit_rate']:.0%} (slots looked up on the device; "
          f"{source.speculative_steps} steps without host syncs, {source.speculation_failures} undone for a miss)",
          f"{mem_runs} x {mem_tok} tok", ">= 0.95x", ratio >= 0.95)
    source.speculative_lookups = source.speculating = False  # the same, with a host sync per MoE layer
    synced = decode_row("cached, synchronous lookups", cmodel, creader, in_memory=True)
    t.add("expert cache", "the same with synchronous lookups (a host sync per MoE layer): tok/s, vs resident",
          f"{synced['tok_s']:.2f}, {synced['tok_s'] / res['tok_s']:.2f}x", f"{mem_runs} x {mem_tok} tok")
    del cmodel, creader, source

    # Where the rest of the gap is: the same flash-moe model with every expert resident in MLX.
    rmodel, _ = flash_moe.load(packed, threads=args.threads, resident_experts=True)
    rres = decode_row("flash resident", rmodel, None, in_memory=True)
    t.add("profile", "flash-moe model, experts resident (no I/O): tok/s, vs mlx-lm",
          f"{rres['tok_s']:.2f}, {rres['tok_s'] / res['tok_s']:.2f}x; streaming warm / this: "
          f"{warm['tok_s'] / rres['tok_s']:.2f}x", f"{mem_runs} x {mem_tok} tok")
    del rmodel

    dmodel, dreader = flash(direct=True)
    direct = decode_row("direct", dmodel, dreader)
    t.add("O_DIRECT", "direct reads (no page cache): tok/s, I/O ms/tok",
          f"{direct['tok_s']:.2f}, {direct['io_s_tok'] * 1e3:.1f}", f"{runs} x {n_tok} tok")
    del dmodel, dreader

    # 4. over memory: the same decode inside a cgroup at 1/3 of the model
    total = expert_bytes + resident_bytes
    om = {"returncode": "skipped (--no-overmem)"}
    cap = total // 3
    budget = min(64 << 20, cap // 8)
    argv = child_argv("--overmem-child", "--packed", str(packed), "--tokens", str(n_tok), "--threads",
                      str(args.threads), "--cache-bytes", str(budget))
    if not cpu:  # the GPU runtime's host memory is measured, at the model's shapes (start_gpu_runtime)
        argv += ["--warmup-packed", str(packed)]
    try:
        if not args.no_overmem:
            # First without a cap (in a group of its own, for the figures): what the process holds.
            probe = run_capped(1 << 42, argv)
            stages = [l.split("] ", 1)[1] for l in probe.get("stderr", "").splitlines() if l.startswith("[overmem child]")]
            t.add("over memory", "the same child without a cap: memory at each stage", "; ".join(stages) or
                  f"rc={probe.get('returncode')}")
            om = run_capped(cap, argv)
    except OSError as exc:
        om = {"returncode": None, "stderr": str(exc)}
    if om.get("returncode") == 0:
        # The child's largest read is one group of its 8-token prompt (max_read_bytes = budget),
        # read in place into one of two sets of record arrays. Its expert cache (budget) is
        # allocated at load, so inside "after load"; MLX may keep budget / 2 of freed buffers.
        buffers = 2 * max(shape.top_k, min(8 * shape.top_k, shape.experts, budget // rec)) * rec
        # On CUDA the cache's slots are managed memory on the GPU, but the CPU writes the records
        # it misses into them: the pages being written sit in host RAM until the GPU reads them
        # (rss_trace measured the whole cache there at once during the prompt).
        transit = 0 if cpu else budget // rec * rec
        budget = budget // 2
        bound = om["rss_loaded"] + buffers + transit + budget  # after load: the GPU runtime's share included
        runtime = "" if cpu else (f"of which GPU runtime {om['rss_runtime'] / 1e6:.0f}; "
                                  f"expert cache slots in transit {transit / 1e6:.0f}; ")
        t.add("over memory", f"cap {cap / 1e6:.0f} MB ({om['cgroup']}, page cache incl.), model {total / 1e9:.2f} GB "
              f"= {total / cap:.1f}x cap", f"completed, {om['tok_s']:.2f} tok/s, hit rate {om['hit_rate']:.0%}, "
              f"cgroup peak {om['cgroup_peak'] / 1e6:.0f} MB, OOM kills {om['oom_kills']}", f"1 x {n_tok} tok",
              "completes", om["oom_kills"] == 0)
        t.add("over memory", "peak RSS vs resident+buffers+budget",
              f"{om['peak_rss'] / 1e6:.0f} MB vs {bound / 1e6:.0f} MB (after load {om['rss_loaded'] / 1e6:.0f}, "
              f"{runtime}read buffers {buffers / 1e6:.0f}, "
              f"MLX buffer cache {budget / 1e6:.0f})", "", "<=", om["peak_rss"] <= bound)
    else:
        peak = om.get("cgroup_peak")
        t.add("over memory", f"cap {cap / 1e6:.0f} MB", f"FAILED rc={om.get('returncode')}, OOM kills "
              f"{om.get('oom_kills')}, cgroup peak {peak / 1e6 if peak else float('nan'):.0f} MB: "
              f"{om.get('stderr', '')[-600:]!r}", "", "completes", False)

    # 5. prefill: one chunk, cold
    pmodel, preader = flash()
    for n in args.prefill:
        pruns = max(1, runs if n <= 256 else runs // 2)
        r = M.median_runs(lambda: M.prefill(pmodel, pmodel.make_cache, n, preader, before=drop), pruns)
        # the resident prefill of long prompts costs minutes on the CPU: only up to 256 tokens
        resident = (f"{M.median_runs(lambda: M.prefill(ref, lambda: make_prompt_cache(ref), n), pruns)['tok_s']:.1f}"
                    if n <= 256 else "not run")
        t.add("prefill", f"{n} tokens cold: tok/s (resident), MB read, max reads of an expert per layer",
              f"{r['tok_s']:.1f} ({resident}), {r['bytes'] / 1e6:.0f} MB = {r['bytes'] / expert_bytes:.0%} "
              f"of experts, {int(r['max_reads'])} (read calls per layer: {int(r['calls_per_layer'])})",
              f"{pruns} x", "1 read per expert per layer", r["max_reads"] == 1)
    t.add("run", "machine", machine())
    t.add("run", "wall time", f"{time.perf_counter() - t_start:.0f} s, medians of {runs} runs unless stated")
    return t.render()


def parser(p: argparse.ArgumentParser = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=os.environ.get("FLASH_MOE_BENCH_DIR", "/tmp/flash-moe-bench"),
                   help="where the synthetic models are built and cached")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    p.add_argument("--tokens", type=int, default=12, help="decode tokens per run")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--prefill", type=int, nargs="*", default=[128, 1024])
    p.add_argument("--raw-bytes", type=float, default=512e6, help="bytes per raw-disk measurement")
    p.add_argument("--prefetch-compare", action="store_true", help="also measure next-layer prefetch")
    p.add_argument("--no-overmem", action="store_true", help="skip the memory-capped run")
    p.add_argument("--out", default=None, help="also write the table to this file")
    # internal: the over-memory child
    p.add_argument("--overmem-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--packed", help=argparse.SUPPRESS)
    p.add_argument("--cache-bytes", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--prefetch", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--warmup-packed", default=None, help=argparse.SUPPRESS)
    return p


def main(args=None) -> int:
    args = args if isinstance(args, argparse.Namespace) else parser().parse_args(args)
    if args.overmem_child:
        overmem_child(args)
        return 0
    table = run(args)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
