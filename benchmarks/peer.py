"""flash-moe against nunspark (a peer that streams mlx-lm MoE experts) on one qwen3_moe model,
both decoding inside the same memory cgroup.

    python -m benchmarks.peer --nunspark /tmp/venv-nunspark/bin/nunspark [--workdir DIR]

nunspark needs MLX 0.31 and runs from its own virtual environment, as a separate program:
nothing of it is imported here. Its environment (mlx-lm 0.32 calls MLX 0.32's API, so pin both):

    python3 -m venv /tmp/venv-nunspark
    /tmp/venv-nunspark/bin/pip install nunspark "mlx[cpu]==0.31.*" "mlx-lm==0.31.*"

Both read the same random 4-bit qwen3_moe checkpoint, built by mlx-lm and packed by each tool;
each run starts with the page cache dropped.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

from . import measure as M
from .memcap import run_capped
from .synthetic import Shape, ensure_models

PROMPT = M.prompt_ids(8)


def flash_child(args) -> None:
    """Inside the cgroup: load the packed qwen3_moe, drop the page cache, decode."""
    import time

    import mlx.core as mx

    import flash_moe

    mx.set_cache_limit(args.cache_bytes // 2)
    t0 = time.perf_counter()
    model, _ = flash_moe.load(args.packed, threads=args.threads, cache_bytes=args.cache_bytes, check="never")
    model.expert_reader.drop_page_cache()
    cache = model.make_cache()
    t1 = time.perf_counter()
    tok = mx.argmax(model(mx.array(PROMPT)[None], cache=cache)[:, -1, :], axis=-1)
    mx.eval(tok)
    t2 = time.perf_counter()
    for _ in range(args.tokens):
        tok = mx.argmax(model(tok[None], cache=cache)[:, -1, :], axis=-1)
        mx.eval(tok)
    t3 = time.perf_counter()
    print(json.dumps({"decode_tok_s": args.tokens / (t3 - t2), "end_to_end_tok_s": args.tokens / (t3 - t1),
                      "load_s": t1 - t0}))


def nunspark_run(binary: str, packed: Path, tokens: int, budget: str, cap: int, extra=()) -> dict:
    """One nunspark generate run under the cap; its own reported tok/s."""
    M.drop_page_cache(sorted(p for p in packed.rglob("*") if p.is_file()))
    argv = [binary, "generate", str(packed), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-tokens",
            str(tokens), "--budget", budget, "--metrics", "--no-chat-template", *extra]
    r = run_capped(cap, argv)
    m = re.search(r"generated tokens\s*:\s*(\d+) in ([\d.]+)s\s*\(([\d.]+) tok/s", r.get("stdout", "") or "")
    return {"ok": r["returncode"] == 0 and m is not None, "tok_s": float(m.group(3)) if m else None,
            "oom_kills": r["oom_kills"], "rc": r["returncode"], "tail": (r.get("stderr") or "")[-300:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/flash-moe-bench")
    p.add_argument("--nunspark", default="/tmp/venv-nunspark/bin/nunspark")
    p.add_argument("--tokens", type=int, default=12)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--flash-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--packed", help=argparse.SUPPRESS)
    p.add_argument("--cache-bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.flash_child:
        flash_child(args)
        return 0

    shape = Shape(arch="qwen3_moe")
    paths = ensure_models(shape, Path(args.workdir), print)
    root = paths["packed"].parent
    nun_dir = root / "nunspark"
    if not nun_dir.exists():
        subprocess.run([args.nunspark, "pack", str(paths["mlx_lm"]), str(nun_dir)], check=True)
    model_bytes = sum(f.stat().st_size for f in paths["packed"].rglob("*") if f.is_file())
    cap = model_bytes // 3
    budget = min(64 << 20, cap // 8)

    flash = []
    for _ in range(args.runs):
        r = run_capped(cap, [sys.executable, "-m", "benchmarks.peer", "--flash-child", "--packed",
                             str(paths["packed"]), "--tokens", str(args.tokens), "--threads", str(args.threads),
                             "--cache-bytes", str(budget)])
        flash.append(r)
    configs = {"budget 200MB": ("200MB", ()),
               "budget 200MB, 8 io threads, warm window 4": ("200MB", ("--io-threads", "8", "--warm-window", "4"))}
    nun = {name: [nunspark_run(args.nunspark, nun_dir, args.tokens, b, cap, extra) for _ in range(args.runs)]
           for name, (b, extra) in configs.items()}

    ok = [r for r in flash if r["returncode"] == 0]
    fd = statistics.median(r["decode_tok_s"] for r in ok) if ok else float("nan")
    fe = statistics.median(r["end_to_end_tok_s"] for r in ok) if ok else float("nan")
    print(f"qwen3_moe {shape.key}: model {model_bytes / 1e9:.2f} GB, cap {cap / 1e6:.0f} MB (cgroup, page cache "
          f"incl.), {args.tokens} tokens, {args.runs} runs each, page cache dropped per run")
    print(f"flash-moe : {len(ok)}/{len(flash)} completed, decode {fd:.2f} tok/s, prompt+decode {fe:.2f} tok/s "
          f"(RAM cache {budget >> 20} MiB)")
    best = 0.0
    for name, rs in nun.items():
        good = [r["tok_s"] for r in rs if r["ok"]]
        med = statistics.median(good) if good else float("nan")
        best = max(best, med) if good else best
        print(f"nunspark  : {name}: {len(good)}/{len(rs)} completed, {med:.2f} tok/s (its own metric)"
              + ("" if good else f" rc={rs[0]['rc']} oom={rs[0]['oom_kills']} {rs[0]['tail']!r}"))
    if best:
        print(f"ratio flash-moe / best nunspark: decode {fd / best:.2f}x, prompt+decode {fe / best:.2f}x (goal >= 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
