"""Host time to add one operation to MLX's graph (nothing evaluated), in microseconds per call.

A decode step of a 60-layer model makes a few hundred such calls; on a fast GPU their Python
and C++ cost is of the size of the kernels' own time. Compares flash-moe's kernel entry points
(planned once per signature, then replayed) with planning from scratch, a bare custom kernel
and MLX's own operations at the real expert shapes. Needs an MLX GPU backend.

Usage: python -m benchmarks.launch_overhead [--calls 200] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx

from flash_moe import kernels
from flash_moe.kernels import launch
from flash_moe.kernels.reference import ExpertWeights, Projection

E, D, I, K = 16, 4096, 1024, 10  # 16 experts suffice: the cost does not depend on their count


def quantized(rows: int, cols: int) -> Projection:
    w = (mx.random.normal((E, rows, cols)) * 0.02).astype(mx.bfloat16)
    return Projection(*mx.quantize(w, group_size=64, bits=4))


def per_call_us(fn, calls: int, reps: int) -> float:
    mx.eval(fn())  # compile / plan once
    times = []
    for _ in range(reps):
        outs = []
        t0 = time.perf_counter()
        for _ in range(calls):
            outs.append(fn())
        times.append((time.perf_counter() - t0) / calls * 1e6)
        mx.eval(outs)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    target = kernels.gpu_target()
    if target is None:
        raise SystemExit("needs an MLX GPU backend (Metal or CUDA): the kernels do not run on the CPU")
    w = ExpertWeights(quantized(I, D), quantized(I, D), quantized(D, I), 4, 64)
    x = mx.random.normal((1, D)).astype(mx.bfloat16)
    inds = mx.arange(K, dtype=mx.int32)[None]
    scores = mx.softmax(mx.random.normal((1, K)), axis=-1).astype(mx.bfloat16)
    shared, gate = mx.random.normal((1, D)).astype(mx.bfloat16), mx.zeros((1, 1), mx.bfloat16)
    y32 = kernels.expert_mlp(x, w, inds, scores, out_dtype=mx.float32)
    q, v = mx.random.normal((1, 4, 64)).astype(mx.bfloat16), mx.random.normal((1, 8, 64)).astype(mx.bfloat16)
    g, state = mx.zeros((1, 8), mx.bfloat16), mx.zeros((1, 8, 64, 64), mx.float32)
    norm_w = mx.ones((D,), mx.bfloat16)
    mx.eval(w.gate.weight, w.up.weight, w.down.weight, x, scores, shared, y32, q, v, g, state, norm_w)
    plans = launch.plan_expert_mlp(target, x, w, inds, scores, out_dtype=mx.float32)
    version = launch.default_version(1)
    bare = (mx.fast.metal_kernel if target == "metal" else mx.fast.cuda_kernel)(
        name="bare", input_names=["a"], output_names=["o"], source="o[0] = a[0];")
    cases = {
        f"kernels.expert_mlp (v{version}, replayed)": lambda: kernels.expert_mlp(x, w, inds, scores, out_dtype=mx.float32),
        "  plan_expert_mlp from scratch": lambda: launch.plan_expert_mlp(target, x, w, inds, scores, out_dtype=mx.float32),
        "  launch.run_all of those plans": lambda: launch.run_all(target, plans),
        "kernels.moe_combine": lambda: kernels.moe_combine(y32, shared, gate, shared, out_dtype=mx.bfloat16),
        "kernels.gated_delta_step": lambda: kernels.gated_delta_step(q, q, v, g, g, state),
        "a bare custom kernel (1 input)": lambda: bare(inputs=[x], grid=(32, 1, 1), threadgroup=(32, 1, 1),
                                                       output_shapes=[(1,)], output_dtypes=[mx.float32]),
        "mx.gather_qmm (one projection)": lambda: mx.gather_qmm(x, w.gate.weight, w.gate.scales, w.gate.biases,
                                                                rhs_indices=inds, transpose=True, group_size=64,
                                                                bits=4),
        "mx.fast.rms_norm": lambda: mx.fast.rms_norm(x, norm_w, 1e-6),
        "x + 1": lambda: x + 1,
    }
    print(f"{mx.default_device()} ({target}), median of {args.reps} x {args.calls} calls")
    for name, fn in cases.items():
        print(f"{name:36s} {per_call_us(fn, args.calls, args.reps):7.1f} us/call")


if __name__ == "__main__":
    main()
