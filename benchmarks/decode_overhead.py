"""Where a decode step's time goes when nothing is read from disk: flash-moe against mlx-lm.

Per token, the Python time to build the step's graph and the time to evaluate it, for:
``kernels`` (flash-moe, every expert resident, custom kernels, one-token steps compiled),
``kernels eager`` (the same op by op: ``FLASH_MOE_COMPILE=0``), ``reference`` (plain-MLX ops
instead of the kernels), ``cache`` / ``cache eager`` (the device expert cache holding every
expert, speculative slot lookups), and ``mlx-lm`` (the same weights resident in mlx-lm). The
modes alternate, so drift of a noisy machine hits all of them.

Usage: python -m benchmarks.decode_overhead [--workdir DIR] [--hidden 4096 --intermediate 1024
       --experts 128 --layers 6 --top-k 10] [--reps 5] [--tokens 24] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from pathlib import Path

import mlx.core as mx
import flash_moe
from flash_moe import kernels
from flash_moe.models import compiled

from . import measure as M
from .synthetic import Shape, ensure_models

MODES = ("kernels", "kernels eager", "reference", "cache", "cache eager", "mlx-lm")


def step_times(model, make_cache, prompt, n: int):
    """tok/s over ``n`` greedy steps, and the median build / eval milliseconds per step."""
    cache = make_cache()
    tok = mx.argmax(model(mx.array(prompt)[None], cache=cache)[:, -1, :], axis=-1)
    mx.eval(tok)
    build, evals = [], []
    start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        tok = mx.argmax(model(tok[None], cache=cache)[:, -1, :], axis=-1)
        t1 = time.perf_counter()
        mx.eval(tok)
        build.append(t1 - t0)
        evals.append(time.perf_counter() - t1)
    return n / (time.perf_counter() - start), statistics.median(build) * 1e3, statistics.median(evals) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/flash-moe-bench")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--profile", action="store_true", help="also cProfile 48 steps of kernels and cache")
    args = ap.parse_args()
    cpu = mx.default_device().type == mx.cpu
    shape = Shape(hidden=args.hidden, intermediate=args.intermediate, experts=args.experts, layers=args.layers,
                  top_k=args.top_k, dtype="float32" if cpu else "bfloat16")
    paths = ensure_models(shape, Path(args.workdir))
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    resident, _ = flash_moe.load(paths["packed"], resident_experts=True, check="never")
    ref, _ = load_model(paths["mlx_lm"])
    expert_bytes = sum(f.stat().st_size for f in M.expert_files(paths["packed"]))
    cached, _ = flash_moe.load(paths["packed"], cache_bytes=expert_bytes, check="never")
    source = cached.expert_source
    M.fill_expert_cache(cached)  # every expert cached before any timing
    prompt = M.prompt_ids(8)

    results = {m: [] for m in MODES}
    try:
        for _ in range(args.reps):
            for mode in MODES:
                if mode == "mlx-lm":
                    results[mode].append(step_times(ref, lambda: make_prompt_cache(ref), prompt, args.tokens))
                    continue
                compiled.set_enabled(not mode.endswith("eager"))
                kernels.set_backend("reference" if mode == "reference" else "auto")
                model = cached if mode.startswith("cache") else resident
                step_times(model, model.make_cache, prompt, 2)
                results[mode].append(step_times(model, model.make_cache, prompt, args.tokens))
    finally:
        compiled.set_enabled(None)
        kernels.set_backend("auto")
    print(f"{shape.key} on {mx.default_device()}, {args.reps} x {args.tokens} tokens per mode")
    for mode, rs in results.items():
        med = [statistics.median(r[i] for r in rs) for i in range(3)]
        print(f"{mode:14s} {med[0]:8.1f} tok/s (runs: " + " ".join(f"{r[0]:.0f}" for r in rs)
              + f")  build {med[1]:.2f} ms  eval {med[2]:.2f} ms per token")
    print(f"cache: {source.speculative_steps} speculative steps, {source.speculation_failures} undone")
    if args.profile:
        for name, model in (("kernels", resident), ("cache", cached)):
            step_times(model, model.make_cache, prompt, 4)
            prof = cProfile.Profile()
            prof.enable()
            step_times(model, model.make_cache, prompt, 48)
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
            print(f"--- {name}, by own time\n" + "\n".join(out.getvalue().splitlines()[6:22]))


if __name__ == "__main__":
    main()
