"""One-token expert matvec calls for a GPU profiler (e.g. Nsight Compute):

    ncu --set full python3 tools/profile_expert_mlp.py [--bits 4] [--k 10] [--calls 6]
    ncu --metrics gpu__time_duration.sum --csv python3 tools/profile_expert_mlp.py --sweep
    python3 tools/ncu_sweep.py --gate-up 1,12,0 1,16,264,0,16 --down 1,256 1,256,1   (a table)

Each call is evaluated alone (one graph per call), on a different copy of the records so that
no call finds its weights in L2; the profiler sees the kernels as a decode step runs them.
``--sweep`` runs the v2 kernels at several launch shapes (their template values name them in
the profile); ``--mma`` adds v6 gate/up shapes (matrix units).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

import flash_moe.kernels as K  # noqa: E402
from flash_moe.kernels import launch  # noqa: E402
from benchmarks.kernels import make_experts, H  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--sets", type=int, default=4)
    p.add_argument("--calls", type=int, default=6)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--gate-up", nargs="*", default=None,
                   help="R,W,threadgroups[,DB[,PF[,DH[,HP]]]] for the sweep (DB: double buffer, PF: L2 hints, "
                   "DH: hints of down's rows, HP: half-precision products)")
    p.add_argument("--down", nargs="*", default=None, help="R,threadgroups[,PF[,HP]] (as many as --gate-up)")
    p.add_argument("--mma", nargs="*", default=None,
                   help="S,WR,PD,threadgroups[,CS[,RBM[,PF[,XB[,DH[,MD]]]]]]: v6 gate/up shapes to run too (default "
                   "down; MD 1: down on the matrix units)")
    a = p.parse_args()
    gate_up_shapes = [tuple(map(int, t.split(","))) for t in a.gate_up] if a.gate_up is not None else GATE_UP
    down_shapes = [tuple(map(int, t.split(","))) for t in a.down] if a.down is not None else DOWN
    sets = [make_experts(a.experts, a.bits, seed) for seed in range(a.sets)]
    x = (mx.random.normal((1, H)) * 0.5).astype(mx.bfloat16)
    inds = mx.random.permutation(a.experts)[: a.k][None].astype(mx.int32)
    scores = mx.softmax(mx.random.normal((1, a.k)), axis=-1)
    mx.eval(x, inds, scores)
    # the library's shapes for this bfloat16 x (half-precision products where the _hp shapes ask)
    shapes = [tuple(dict(launch.v2_shape("cuda", k, a.bits, mx.bfloat16)[0]) for k in ("gate_up", "down"))]
    if a.sweep:
        shapes += [(dict(zip(("R", "W", "tgs", "DB", "PF", "DH", "HP"), g)), dict(zip(("R", "tgs", "PF", "HP"), d)))
                   for g, d in zip(gate_up_shapes, down_shapes)]
    default_down = shapes[0][1]
    for m in a.mma or []:
        shapes.append((dict(zip(("S", "WR", "PD", "tgs", "CS", "RBM", "PF", "XB", "DH", "MD"), map(int, m.split(",")))),
                       default_down))
    for gate_up, down in shapes:
        mma = "S" in gate_up  # a v6 shape
        launch.PROJECTION_VERSION = 6 if mma else 2
        # a shape with HP 1 or 2 runs as the half-precision shape, one without as the float32 one
        if mma:
            launch.TUNING["gate_up_mma"] = gate_up
        else:
            launch.TUNING["gate_up_pf"] = launch.TUNING["gate_up_hp"] = dict(gate_up, HP=gate_up.get("HP", 0))
        launch.TUNING["down_pf"] = launch.TUNING["down_hp"] = dict(down, HP=down.get("HP", 0))
        for i in range(a.calls):
            mx.eval(K.expert_mlp(x, sets[i % a.sets], inds, scores, out_dtype=mx.float32))
            mx.synchronize()
        print("ran", json.dumps([gate_up, down]), flush=True)


# Launch shapes of the sweep, in pairs (gate/up R, W, threadgroups; down R, threadgroups).
GATE_UP = [(1, 4, 396), (1, 4, 264), (1, 8, 132), (1, 8, 198), (1, 2, 792), (1, 2, 528), (2, 4, 256),
           (2, 4, 396), (1, 4, 512), (1, 4, 320), (2, 2, 528), (1, 4, 1024)]
DOWN = [(2, 128), (4, 256), (2, 256), (1, 256), (4, 64), (1, 512), (2, 512), (1, 128), (4, 128), (4, 128),
        (4, 128), (4, 128)]


if __name__ == "__main__":
    main()
