"""What MLX's own kernels take to read the bytes of one expert call, for a GPU profiler:

    ncu --metrics gpu__time_duration.sum,dram__bytes_read.sum python3 tools/read_ceiling.py

Sums uint32 arrays as large as the gate/up weights (with scales and biases) and the down weights
of a 4-bit k=10 call at hidden 4096, expert 1024, each evaluated alone (a fresh array per call),
so the profile shows the time a plain streaming read of those bytes takes in one kernel, ramp
and tail included: the practical ceiling the expert kernels are held against.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from benchmarks.kernels import expert_bytes  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--calls", type=int, default=4)
    a = p.parse_args()
    matrix = expert_bytes(a.bits) // 3  # one of gate, up, down: weights + bf16 scales and biases
    for name, nbytes in (("gate_up", 2 * a.k * matrix), ("down", a.k * matrix)):
        for i in range(a.calls):
            x = mx.random.randint(0, 1 << 30, (nbytes // 4,), dtype=mx.uint32)
            mx.eval(x)
            mx.eval(mx.sum(x))
        print(f"read {name} {nbytes / 1e6:.1f} MB", flush=True)


if __name__ == "__main__":
    main()
