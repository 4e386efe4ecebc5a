"""Decode tok/s of one packed model with each expert-projection kernel version, side by side.

The versions run in alternation (v_a, v_b, v_a, ...) on the same loaded model so that drift of a
noisy machine hits both; the first pair warms up (kernel compilation) and is reported but not
in the median. Runs on an MLX GPU backend (the kernels) after the model was built, e.g. by
``benchmarks/streaming.py`` (its ``--workdir``).

Usage: python -m benchmarks.projection_ab PACKED [--mode resident|cache] [--versions 2,4]
       [--pairs 8] [--tokens 24]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import flash_moe
from flash_moe.kernels import launch

from . import measure as M


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packed", type=Path, help="a packed flash-moe model directory")
    ap.add_argument("--mode", choices=("resident", "cache"), default="resident",
                    help="every expert resident, or an expert cache large enough for all of them")
    ap.add_argument("--versions", default="2,4")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=16)
    args = ap.parse_args()
    expert_bytes = sum(f.stat().st_size for f in M.expert_files(args.packed))
    kw = dict(resident_experts=True) if args.mode == "resident" else dict(cache_bytes=expert_bytes)
    model, _ = flash_moe.load(args.packed, threads=args.threads, check="never", **kw)
    if args.mode == "cache":
        M.fill_expert_cache(model)  # the versions are timed on hits, not on the reads that fill it
    prompt = M.prompt_ids(8)
    versions = [int(v) for v in args.versions.split(",")]
    samples = {v: [] for v in versions}
    for _ in range(args.pairs):
        for v in versions:
            launch.PROJECTION_VERSION = v
            M.decode(model, model.make_cache, prompt, 3)
            samples[v].append(M.decode(model, model.make_cache, prompt, args.tokens)["tok_s"])
    for v, ts in samples.items():
        print(f"{args.mode} v{v}: " + " ".join(f"{t:7.1f}" for t in ts)
              + f" | median of pairs 2-{args.pairs}: {statistics.median(ts[1:] or ts):7.1f} tok/s")


if __name__ == "__main__":
    main()
