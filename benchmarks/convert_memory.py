"""Peak memory of a conversion against the checkpoint's size (conversion must stream).

    python benchmarks/convert_memory.py [--layers 12] [--work DIR]

Builds a random bf16 Qwen3.5-MoE checkpoint of a few GB (cached in --work), converts it to
4 bits in a fresh process, and prints that process's peak RSS next to the checkpoint size.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

BUILD = """
import sys
from flash_moe.tiny import make_tiny_checkpoint
make_tiny_checkpoint(sys.argv[1], dtype="bfloat16", shard_bytes=1 << 30, num_hidden_layers=int(sys.argv[2]),
                     hidden_size=1024, moe_intermediate_size=512, shared_expert_intermediate_size=512,
                     num_experts=64, num_experts_per_tok=4, num_attention_heads=8, num_key_value_heads=2,
                     head_dim=128, linear_num_key_heads=4, linear_num_value_heads=8,
                     linear_key_head_dim=128, linear_value_head_dim=128, vocab_size=4096)
"""

CONVERT = """
import resource, sys, time
import flash_moe
t = time.perf_counter()
flash_moe.convert(sys.argv[1], sys.argv[2], bits=4, overwrite=True, progress=False)
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def size_of(path: Path, pattern: str) -> int:
    return sum(f.stat().st_size for f in path.rglob(pattern))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--work", default="/tmp/flash-moe-convert-bench")
    args = ap.parse_args()
    work = Path(args.work)
    src = work / f"hf-{args.layers}"
    if not (src / "config.json").exists():
        subprocess.run([sys.executable, "-c", BUILD, str(src), str(args.layers)], check=True)
    ckpt = size_of(src, "*.safetensors")
    out = subprocess.run([sys.executable, "-c", CONVERT, str(src), str(work / "packed")], check=True,
                         capture_output=True, text=True).stdout.split()
    seconds, peak_kb = float(out[0]), int(out[1])
    packed = size_of(work / "packed", "*.bin") + size_of(work / "packed", "*.safetensors")
    biggest = max(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"].values(),
                  key=lambda f: (src / f).stat().st_size)
    print(f"machine: {platform.machine()} {platform.system()}, python {platform.python_version()}")
    print(f"checkpoint (bf16): {ckpt / 1e9:.2f} GB in {len(list(src.glob('*.safetensors')))} files "
          f"(largest {(src / biggest).stat().st_size / 1e9:.2f} GB)")
    print(f"packed (4-bit):    {packed / 1e9:.2f} GB, converted in {seconds:.1f} s "
          f"({ckpt / seconds / 1e6:.0f} MB/s of checkpoint)")
    print(f"peak RSS of the converting process: {peak_kb / 1e6:.2f} GB = {peak_kb * 1e3 / ckpt:.2f}x the checkpoint")


if __name__ == "__main__":
    main()
