"""Benchmark the custom kernels against MLX's own ops on the same records, on this GPU.

Prints side by side, per case: our kernel and the reference (``gather_qmm`` path of
``reference.expert_mlp``, a ``quantized_matmul`` loop, ``mx.fast.gated_delta_update``, the
plain-MLX combine), in microseconds per call and in GB/s of weight bytes, against the
device-memory bandwidth measured in the same run (a large device copy).

Timing: the calls of a batch are built first, then one ``mx.eval`` runs them all; the
time of that eval over the number of calls is one sample, the median of several samples
is reported. Calls of a batch are independent (the GPU may overlap them: a throughput)
except in the ``chained`` rows, where each call's input is the previous call's output (the
latency a decode sees, layer after layer). ``sets`` > 1 rotates independent copies of the records (different "layers")
so that consecutive calls cannot hit in L2 (50 MB on an H100).

Usage: python benchmarks/kernels.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

import flash_moe.kernels as K  # noqa: E402
from flash_moe.kernels import codegen, launch, reference  # noqa: E402
from flash_moe.kernels.reference import ExpertWeights, Projection  # noqa: E402

H, I, GS = 4096, 1024, 64
ROWS: List[Dict] = []
CALLS_SCALE = 1.0  # the dry run shrinks the batches


def timeit(make: Callable[[int], object], calls: int = 40, samples: int = 7) -> float:
    """Median seconds per call; make(i) builds (lazily) the i-th call's outputs."""
    calls, samples = max(1, int(calls * CALLS_SCALE)), max(1, int(samples * CALLS_SCALE))
    mx.eval(make(0))
    mx.eval([make(i) for i in range(min(calls, 8))])  # compile / warm every set
    times = []
    for _ in range(samples):
        outs = [make(i) for i in range(calls)]
        mx.synchronize()
        t = time.perf_counter()
        mx.eval(outs)
        mx.synchronize()
        times.append((time.perf_counter() - t) / calls)
    return statistics.median(times)


def chained(call: Callable[[mx.array, int], mx.array], x0: mx.array) -> Callable[[int], object]:
    """make(i) for ``timeit`` where call i's input is call i-1's output (a new chain at i = 0).

    Independent calls in one evaluation may run side by side on the GPU (MLX records them in a
    CUDA graph), so their time per call is a throughput that hides each launch's ramp and tail;
    a decode runs its MoE layers one after the other, and this is that latency."""
    state = {"x": x0}

    def make(i: int):
        if i == 0:
            state["x"] = x0
        y = call(state["x"], i)
        state["x"] = y
        return y
    return make


def peak_bandwidth() -> float:
    """GB/s of a large device copy (bytes read + bytes written)."""
    x = mx.random.uniform(shape=(256 * 1024 * 1024 if H == 4096 else 1 << 20,))  # 1 GiB of float32
    mx.eval(x)
    t = timeit(lambda i: x + 1.0, calls=10, samples=5)
    return 2 * x.nbytes / t / 1e9


def make_experts(U: int, bits: int, seed: int) -> ExpertWeights:
    mx.random.seed(seed)

    def proj(rows, cols):
        q, s, b = mx.quantize(mx.random.normal((U, rows, cols)) / cols ** 0.5, group_size=GS, bits=bits)
        return Projection(q, s.astype(mx.bfloat16), b.astype(mx.bfloat16))

    w = ExpertWeights(proj(I, H), proj(I, H), proj(H, I), bits, GS)
    mx.eval(w.gate.weight, w.up.weight, w.down.weight)
    return w


def expert_bytes(bits: int) -> int:
    """Weight + scale + bias bytes of one expert (gate, up, down), bf16 scales."""
    n = 3 * H * I
    return n * bits // 8 + 2 * (n // GS) * 2


def rel(a, b) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.linalg.norm(a - b) / mx.linalg.norm(b)).item()


def row(kind: str, case: str, ours_s: float, ref_s: Optional[float], nbytes: int, peak: float,
        ref_name: str, err: Optional[float] = None, other: str = "") -> None:
    r = dict(kind=kind, case=case, ours_us=ours_s * 1e6, ref=ref_name,
             ref_us=None if ref_s is None else ref_s * 1e6,
             ours_gbs=nbytes / ours_s / 1e9 if nbytes else None,
             ref_gbs=(nbytes / ref_s / 1e9) if (nbytes and ref_s) else None,
             pct_peak=100 * nbytes / ours_s / 1e9 / peak if nbytes else None,
             speedup=(ref_s / ours_s) if ref_s else None, rel_err=err, note=other)
    ROWS.append(r)
    print(format_row(r), flush=True)


def format_row(r: Dict) -> str:
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    return (f"{r['kind']:<12} {r['case']:<34} {f(r['ours_us'], '9.1f')} {f(r['ours_gbs'], '8.0f')} "
            f"{f(r['pct_peak'], '6.1f')}% | {r['ref']:<18} {f(r['ref_us'], '9.1f')} {f(r['ref_gbs'], '8.0f')} "
            f"| x{f(r['speedup'], '5.2f')} {f(r['rel_err'], '8.1e')} {r['note']}")


HEADER = (f"{'kernel':<12} {'case':<34} {'ours us':>9} {'GB/s':>8} {'%peak':>7} | {'reference':<18} "
          f"{'ref us':>9} {'GB/s':>8} | {'speedup':>6} {'rel err':>8}")


def qmm_loop(x, w: ExpertWeights, inds_host: np.ndarray, scores):
    """The decode MoE as per-expert mx.quantized_matmul calls (N = 1)."""
    q = lambda v, p, e: mx.quantized_matmul(v, p.weight[e], p.scales[e], p.biases[e], transpose=True,  # noqa: E731
                                            group_size=GS, bits=w.bits)
    out = None
    for j, e in enumerate(inds_host[0].tolist()):
        g, u = q(x, w.gate, e), q(x, w.up, e)
        y = q(g * mx.sigmoid(g) * u, w.down, e) * scores[0, j]
        out = y if out is None else out + y
    return out


def bench_expert_mlp(peak: float, bits: int, k: int, N: int, sets: int, with_loop: bool, version: int = 1) -> None:
    U = N * k  # the records read for this step: k per token, all distinct (worst case)
    ws = [make_experts(U, bits, seed=s) for s in range(sets)]
    rng = np.random.default_rng(k * N)
    inds_h = np.stack([rng.permutation(U)[:k] for _ in range(N)]).astype(np.int32) if N > 1 else \
        np.arange(k, dtype=np.int32)[None]
    inds = mx.array(inds_h)
    x = mx.random.normal((N, H)).astype(mx.bfloat16)
    scores = mx.softmax(mx.random.normal((N, k)), axis=-1).astype(mx.bfloat16)
    target = K.active_backend()
    ours = timeit(lambda i: launch.expert_mlp(target, x, ws[i % sets], inds, scores, version=version))
    ref = timeit(lambda i: reference.expert_mlp(x, ws[i % sets], inds, scores))
    err = rel(launch.expert_mlp(target, x, ws[0], inds, scores, version=version),
              reference.expert_mlp(x, ws[0], inds, scores))
    nbytes = U * expert_bytes(bits)
    case = f"b{bits} k{k} N{N} sets{sets}"
    kind = f"expert_mlp{version}"
    row(kind, case, ours, ref, nbytes, peak, "gather_qmm (ref)", err)
    if N == 1:  # latency: each call takes the previous call's output as its x, as layers do
        lat = timeit(chained(lambda xi, i: launch.expert_mlp(target, xi, ws[i % sets], inds, scores, version=version), x))
        lat_ref = timeit(chained(lambda xi, i: reference.expert_mlp(xi, ws[i % sets], inds, scores), x))
        row(kind, case + " chained", lat, lat_ref, nbytes, peak, "gather_qmm chained")
    if sets > 1:  # the routed sum in float32, as the MoE layer asks for it (v4: no cast back)
        f32 = timeit(lambda i: launch.expert_mlp(target, x, ws[i % sets], inds, scores, version=version,
                                                 out_dtype=mx.float32))
        row(kind, case + " f32", f32, ref, nbytes, peak, "gather_qmm (ref)")
    if with_loop and N == 1:
        loop = timeit(lambda i: qmm_loop(x, ws[i % sets], inds_h, scores))
        row(kind, case, ours, loop, nbytes, peak, "quantized_matmul x3k")


# Launch shapes tried by the autotune, per projection version: (TUNING key, configs).
CONFIGS = {
    1: (("gate_up", [dict(R=4, W=4), dict(R=4, W=8), dict(R=2, W=8)]),
        ("down", [dict(R=2, W_max=16), dict(R=4, W_max=16), dict(R=8, W_max=16)])),
    # v2: the autotune's x is bfloat16, so on CUDA v2 runs the _hp shapes (half-precision
    # products); an HP 0 candidate runs the float32 shapes (gate_up_pf, down_pf) as they are (their
    # own sweeps: KERNELS_NOTES.md, Runs 8-13). Each candidate goes on top of launch.TUNING.
    2: (
        ("gate_up_hp", [dict(R=1, W=16, tgs=0, HP=2), dict(R=1, W=16, tgs=0, HP=1), dict(R=1, W=12, tgs=0, HP=2),
                        dict(R=2, W=8, tgs=0, HP=2), dict(R=1, W=16, tgs=0, HP=2, DH=5), dict(HP=0)]),
        ("down_hp", [dict(R=4, tgs=256, HP=1), dict(R=2, tgs=512, HP=1), dict(R=8, tgs=256, HP=1),
                     dict(R=4, tgs=128, HP=1), dict(R=4, tgs=256, HP=2), dict(HP=0)])),
    4: (("expert_mlp_sk", [dict(C=64, W=4, R=1, RD=2), dict(C=64, W=8, R=1, RD=2), dict(C=64, W=4, R=2, RD=2),
                           dict(C=64, W=4, R=1, RD=4), dict(C=64, W=2, R=1, RD=2), dict(C=128, W=4, R=1, RD=2),
                           dict(C=128, W=8, R=1, RD=2), dict(C=128, W=8, R=2, RD=4), dict(C=32, W=4, R=1, RD=2),
                           dict(C=32, W=8, R=1, RD=1)]),),
    # v6: gate/up on the matrix units (S warps per 16-row item, WR items at once, PD blocks in flight;
    # XB: x staged once per token by a launch of its own; DH: down's rows hinted, as v2's; MD: down
    # on the matrix units too, T 16-row tiles per threadgroup, PD blocks in flight)
    6: (("gate_up_mma", [dict(S=16, WR=1, PD=2, tgs=0, PF=0), dict(S=8, WR=2, PD=2, tgs=0, PF=0), dict(S=8, WR=2, PD=2, tgs=0, PF=1),
                         dict(S=4, WR=4, PD=2, tgs=0, PF=1), dict(S=16, WR=1, PD=1, tgs=0, PF=1),
                         dict(S=8, WR=2, PD=2, tgs=0, PF=1, XB=0), dict(S=16, WR=1, PD=2, tgs=0, PF=0, XB=0),
                         dict(S=8, WR=2, PD=2, tgs=0, PF=1, DH=9), dict(S=8, WR=2, PD=2, tgs=0, PF=1, XB=0, DH=9),
                         dict(S=8, WR=2, PD=2, tgs=0, PF=1, MD=1), dict(S=16, WR=1, PD=2, tgs=0, PF=1, MD=1)]),
        ("down_hp", [dict(R=4, tgs=256, HP=1), dict(R=2, tgs=512, HP=1), dict(HP=0)]),
        ("down_mma", [dict(T=1, PD=2), dict(T=1, PD=4), dict(T=2, PD=4), dict(T=1, PD=8), dict(T=4, PD=2)])),
    5: (("expert_mlp_ska", [dict(C=64, W=4, R=1, RD=4, P=4), dict(C=64, W=4, R=1, RD=4, P=3),
                            dict(C=64, W=4, R=1, RD=2, P=4), dict(C=64, W=4, R=1, RD=4, P=6),
                            dict(C=64, W=2, R=1, RD=4, P=6), dict(C=64, W=8, R=1, RD=4, P=3),
                            dict(C=32, W=2, R=1, RD=4, P=4), dict(C=32, W=4, R=1, RD=4, P=4)]),),
}


def autotune(peak: float, bits: int, version: int, k: int = 10, sets: int = 8) -> None:
    """Time the whole projection (N = 1, rotated records) chained, call after call as a decode's
    layers run, over each kernel's launch shapes in turn (the other kernel at its best so far),
    and keep the fastest in ``launch.TUNING_BITS`` for these bits. (Independent calls would
    overlap on the GPU and reward grids too small to fill it alone.)"""
    ws = [make_experts(k, bits, seed=10 + s) for s in range(sets)]
    x = mx.random.normal((1, H)).astype(mx.bfloat16)
    inds = mx.arange(k, dtype=mx.int32)[None]
    scores = mx.softmax(mx.random.normal((1, k)), axis=-1).astype(mx.bfloat16)
    target = K.active_backend()
    nbytes = k * expert_bytes(bits)
    wanted = {2: (codegen.GATE_UP_PF, codegen.GATE_UP_PF_DH), 4: (codegen.EXPERT_MLP_SK,),
              5: (codegen.EXPERT_MLP_SKA,), 6: (codegen.GATE_UP_MMA, codegen.GATE_UP_MMA_DH,
                                                  codegen.STAGE_X_MMA)}.get(version)
    best = {}
    for key, configs in CONFIGS[version]:
        for cfg in configs:
            cfg = dict(launch.TUNING[key], **cfg)  # (on top of the defaults)
            launch.TUNING_BITS[(key, bits)] = cfg
            plans = launch.plan_expert_mlp(target, x, ws[0], inds, scores, version=version)
            if wanted is not None and plans[0].spec not in wanted:
                continue  # this shape falls back to another version
            t = timeit(chained(lambda xi, i: launch.expert_mlp(target, xi, ws[i % sets], inds, scores,
                                                               version=version), x))
            shape = " ".join(f"{n}{v}" for p in plans for n, v in p.template.items()
                             if n in ("C", "R", "RD", "W", "P", "G", "RPT", "DB", "PF", "DH", "S", "PD", "T", "HP"))
            shape += "".join(f" {n}{cfg[n]}" for n in ("XB", "MD") if n in cfg)  # (launches, not template values)
            row(key, f"b{bits} k{k} {shape} chained", t, None, nbytes, peak, "")
            if key not in best or t < best[key][0]:
                best[key] = (t, cfg)
        if key in best:
            launch.TUNING_BITS[(key, bits)] = best[key][1]
        else:  # no launch shape fits these sizes: the version falls back, nothing to tune
            launch.TUNING_BITS.pop((key, bits), None)
    print(f"autotune v{version} b{bits}: " + ", ".join(f"{k_}={v[1]}" for k_, v in best.items()), flush=True)


def bench_combine(peak: float, versions: List[int]) -> None:
    w = make_experts(10, 4, seed=99)
    x = mx.random.normal((1, H)).astype(mx.bfloat16)
    inds = mx.arange(10, dtype=mx.int32)[None]
    scores = mx.softmax(mx.random.normal((1, 10)), axis=-1).astype(mx.bfloat16)
    sh, gate, res = (mx.random.normal(s).astype(mx.bfloat16) for s in ((1, H), (1, 1), (1, H)))
    e = mx.random.normal((1, H)).astype(mx.bfloat16)
    target = K.active_backend()
    ours = timeit(lambda i: launch.moe_combine(target, e, sh, gate, res), calls=200)
    ref = timeit(lambda i: reference.moe_combine(e, sh, gate, res), calls=200)
    err = rel(launch.moe_combine(target, e, sh, gate, res), reference.moe_combine(e, sh, gate, res))
    row("combine", "N1 H4096 bf16", ours, ref, 0, peak, "mlx ops (ref)", err)
    for v in versions:
        fused = timeit(lambda i: launch.expert_mlp(target, x, w, inds, scores, combine=(sh, gate, res), version=v))
        split = timeit(lambda i: launch.moe_combine(target, launch.expert_mlp(target, x, w, inds, scores, version=v),
                                                    sh, gate, res))
        row(f"mlp+combine{v}", "b4 k10 N1 fused vs unfused", fused, split, 10 * expert_bytes(4), peak,
            "unfused kernels")


def bench_gated_delta(peak: float, B: int, dtype) -> None:
    q, k, v, g, beta, _ = reference.random_gated_delta_inputs(B, 16, 64, 128, 128, dtype)
    HV, D = 64, 128
    states = [mx.random.normal((B, HV, D, D)) for _ in range(8)]  # 8 layers' states
    mx.eval(states)
    target = K.active_backend()
    nbytes = 2 * states[0].nbytes  # read + write the state
    ours = timeit(lambda i: launch.gated_delta_step(target, q, k, v, g, beta, states[i % 8]), calls=100)
    ref = timeit(lambda i: reference.gated_delta_step(q, k, v, g, beta, states[i % 8]), calls=100)
    err = rel(launch.gated_delta_step(target, q, k, v, g, beta, states[0])[1],
              reference.gated_delta_step(q, k, v, g, beta, states[0])[1])
    case = f"B{B} Hv64 128x128 {str(dtype).split('.')[-1]}"
    row("gated_delta", case, ours, ref, nbytes, peak, "mlx ops (ref)", err)
    try:
        fast = lambda i: mx.fast.gated_delta_update(  # noqa: E731
            q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], states[i % 8])
        t = timeit(fast, calls=100)
        y_f, s_f = fast(0)
        row("gated_delta", case, ours, t, nbytes, peak, "mx.fast.gdu", rel(s_f, reference.gated_delta_step(
            q, k, v, g, beta, states[0])[1]))
    except Exception as exc:  # not every backend implements it
        print(f"mx.fast.gated_delta_update unavailable: {type(exc).__name__}: {str(exc)[:120]}")


def dry_run() -> None:
    """Exercise this script off the GPU: small shapes, kernels run by the CPU simulator."""
    global H, I, CALLS_SCALE
    H, I, CALLS_SCALE = 1024, 128, 0.01  # (v5 needs rows of at least a warp's width: 1024 at 4 bits)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "metal_check"))
    import simt

    launch._kernel = simt.kernel  # every launch (planned or replayed) runs on the simulator
    K.active_backend = lambda: "cuda"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer cases")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--dry-run", action="store_true", help="check the script on the CPU (simulated kernels)")
    ap.add_argument("--no-autotune", action="store_true", help="time the launch shapes in launch.TUNING as they are")
    ap.add_argument("--versions", default="1,2,4,5,6", help="projection kernel versions to time (default 1,2,4,5,6)")
    ap.add_argument("--bits", default="4,2", help="weight bits of the projection cases (default 4,2)")
    args = ap.parse_args()
    if args.dry_run:
        dry_run()
    target = K.active_backend()
    if target == "reference":
        sys.exit("no GPU backend: nothing to benchmark")
    print(f"mlx {mx.__version__}, backend {target}, device {mx.device_info() if hasattr(mx, 'device_info') else ''}")
    peak = peak_bandwidth()
    print(f"measured device copy bandwidth: {peak:.0f} GB/s (read + write)\n")
    print(HEADER)
    versions = [int(v) for v in args.versions.split(",")]
    bit_widths = [int(b) for b in args.bits.split(",")]
    for version in versions:
        for bits in bit_widths if not args.no_autotune else ():
            autotune(peak, bits, version)
        for bits in bit_widths:
            for k in (10, 4):
                bench_expert_mlp(peak, bits, k, 1, 1, with_loop=(k == 10 and version == versions[0]), version=version)
                bench_expert_mlp(peak, bits, k, 1, 8, with_loop=False, version=version)
        for N in ((4, 8) if not args.quick else (4,)):
            bench_expert_mlp(peak, 4, 10, N, 4, with_loop=False, version=version)
    bench_combine(peak, versions)
    for B, dt in ((1, mx.bfloat16), (1, mx.float32), (8, mx.bfloat16)):
        bench_gated_delta(peak, B, dt)
    print("\n" + HEADER)
    for r in ROWS:
        print(format_row(r))
    print("tuned:", {f"{k}/b{b}": v for (k, b), v in launch.TUNING_BITS.items()})
    if args.json:
        args.json.write_text(json.dumps(dict(peak_gbs=peak, mlx=mx.__version__, rows=ROWS), indent=1))


if __name__ == "__main__":
    main()
