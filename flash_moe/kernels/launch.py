"""Compiling (lazily, cached) and launching the generated kernels on Metal or CUDA.

Every launcher takes the target ("metal" or "cuda") and returns ``None`` when a shape or
dtype is outside what its kernel handles, so the caller can take the reference path.
Launch shapes (rows per warp ``R``, warps per threadgroup ``W``) come from ``TUNING``;
the benchmark overrides them to compare variants.
"""

from __future__ import annotations

import functools
from typing import Dict, Optional, Tuple

import mlx.core as mx

from . import codegen
from .reference import ExpertWeights, Projection

FLOATS = (mx.float32, mx.bfloat16, mx.float16)

# Launch shapes; see benchmarks/KERNELS_NOTES.md for how they were chosen.
TUNING: Dict[str, Dict[str, int]] = {
    "gate_up": {"R": 4, "W": 4},
    "down": {"R": 4, "W_max": 16},
    "combine": {"W": 8},
    "gated_delta": {"R": 2, "W": 4},
}

# Largest token count the projection kernels take; beyond it gather_qmm is used.
MAX_TOKENS = 8

# Threadgroup-memory budget per kernel (Metal guarantees 32 KiB; CUDA static limit 48 KiB).
_SMEM_LIMIT = {"metal": 32 * 1024, "cuda": 48 * 1024}

# Value written into every output before a launch (tests poison with NaN to catch
# elements a kernel never writes); None leaves outputs uninitialised.
POISON: Optional[float] = None


@functools.lru_cache(maxsize=None)
def _kernel(target: str, spec_name: str):
    spec = next(s for s in codegen.ALL_SPECS if s.name == spec_name)
    header, source = codegen.render(spec, target)
    make = mx.fast.metal_kernel if target == "metal" else mx.fast.cuda_kernel
    return make(
        name=spec.kernel_name(target),
        input_names=list(spec.inputs),
        output_names=list(spec.outputs),
        source=source,
        header=header,
        ensure_row_contiguous=True,
    )


def _launch(target, spec, inputs, template, n_groups, group_size, out_shapes, out_dtypes):
    kern = _kernel(target, spec.name)
    return kern(
        inputs=inputs,
        template=codegen.template_args(spec, template),
        grid=(n_groups * group_size, 1, 1),
        threadgroup=(group_size, 1, 1),
        output_shapes=out_shapes,
        output_dtypes=out_dtypes,
        init_value=POISON,
    )


def proj_layout(dim: int, bits: int) -> Optional[Tuple[int, int]]:
    """(EPL, LPR) for a projection whose input dimension is ``dim``, or None if unsupported.

    A lane dequantizes one 16-byte load (EPL = 128/bits elements) at a time; a row is
    covered by LPR lanes: 32, or a power of two below 32 for short rows.
    """
    if bits not in (2, 4, 8):
        return None
    epl = 128 // bits
    if dim % epl:
        return None
    chunks = dim // epl
    if chunks >= 32:
        return (epl, 32) if chunks % 32 == 0 else None
    return (epl, chunks) if chunks & (chunks - 1) == 0 else None


def _proj_ok(p: Projection, rows: int, dim: int, bits: int, gs: int) -> bool:
    if p.scales is None or p.biases is None:
        return False
    if p.weight.dtype != mx.uint32 or p.weight.ndim != 3:
        return False
    if p.weight.shape[1:] != (rows, dim * bits // 32):
        return False
    if p.scales.shape != p.weight.shape[:2] + (dim // gs,) or p.biases.shape != p.scales.shape:
        return False
    return p.scales.dtype in FLOATS and p.biases.dtype == p.scales.dtype


def _rows_per_warp(rows: int, per_slot: int, pref: int) -> Optional[int]:
    """Largest R <= pref (halving) with rows divisible by R * per_slot."""
    r = pref
    while r >= 1:
        if rows % (r * per_slot) == 0:
            return r
        r //= 2
    return None


def expert_mlp(target: str, x: mx.array, w: ExpertWeights, inds: mx.array, scores: mx.array,
               combine: Optional[Tuple[mx.array, mx.array, mx.array]] = None) -> Optional[mx.array]:
    """Two launches: gate/up + SwiGLU into h, then down + routing weights + k-way sum.

    ``combine`` = (shared_out, shared_gate, residual) fuses ``moe_combine`` into the
    second launch. Returns None when the kernels do not cover the inputs.
    """
    if not w.quantized or w.bits not in (2, 4, 8) or w.group_size not in (32, 64, 128):
        return None
    if x.ndim != 2 or inds.ndim != 2 or scores.shape != inds.shape or x.dtype not in FLOATS:
        return None
    N, D = x.shape
    K = inds.shape[1]
    if N != inds.shape[0] or N > MAX_TOKENS or K > 32 or scores.dtype not in FLOATS:
        return None
    bits, gs = w.bits, w.group_size
    if w.gate.weight.ndim != 3:
        return None
    I = w.gate.weight.shape[1]
    lay_d, lay_i = proj_layout(D, bits), proj_layout(I, bits)
    if lay_d is None or lay_i is None or gs % lay_d[0] or D % gs or I % gs:
        return None
    if not (_proj_ok(w.gate, I, D, bits, gs) and _proj_ok(w.up, I, D, bits, gs)
            and _proj_ok(w.down, D, I, bits, gs)):
        return None
    if w.up.scales.dtype != w.gate.scales.dtype:
        return None
    epl, lpr_d = lay_d
    if 4 * (D + D // epl) > _SMEM_LIMIT[target]:
        return None
    if inds.dtype not in (mx.int32, mx.uint32):
        inds = inds.astype(mx.int32)

    # gate/up: W warps x R row slots x SUB rows per threadgroup; one (token, slot) pair each.
    tg = TUNING["gate_up"]
    sub_d = 32 // lpr_d
    W = tg["W"]
    while W > 1 and I % (W * sub_d):
        W //= 2
    R = _rows_per_warp(I, W * sub_d, tg["R"])
    if R is None:
        return None
    (h,) = _launch(
        target, codegen.GATE_UP,
        [x, w.gate.weight, w.gate.scales, w.gate.biases, w.up.weight, w.up.scales, w.up.biases, inds],
        dict(BITS=bits, GS=gs, D=D, I=I, K=K, R=R, W=W, XT=x.dtype, ST=w.gate.scales.dtype),
        N * K * (I // (W * R * sub_d)), W * 32, [(N * K, I)], [mx.float32],
    )

    # down: the W warps of a threadgroup split the K experts and share R x SUB rows.
    td = TUNING["down"]
    sub_i = 32 // lay_i[1]
    Wd = min(K, td["W_max"])
    Rd = _rows_per_warp(D, sub_i, td["R"])
    if Rd is None:
        return None
    tmpl = dict(BITS=bits, GS=gs, D=I, O=D, K=K, R=Rd, W=Wd, ST=w.down.scales.dtype,
                RT=scores.dtype, OutT=x.dtype)
    ins = [h, w.down.weight, w.down.scales, w.down.biases, inds, scores]
    spec = codegen.DOWN
    if combine is not None:
        shared_out, shared_gate, residual = combine
        if (shared_out.shape != (N, D) or residual.shape != (N, D) or shared_gate.shape != (N, 1)
                or shared_out.dtype != residual.dtype or shared_out.dtype not in FLOATS
                or shared_gate.dtype not in FLOATS):
            return None
        spec = codegen.DOWN_COMBINE
        ins += [shared_out, shared_gate.astype(shared_out.dtype), residual]
        tmpl["CT"] = shared_out.dtype
        tmpl["OutT"] = mx.result_type(x.dtype, shared_out.dtype)
    (y,) = _launch(target, spec, ins, tmpl, N * (D // (Rd * sub_i)), Wd * 32, [(N, D)], [tmpl["OutT"]])
    return y


def moe_combine(target: str, expert_out: mx.array, shared_out: mx.array, shared_gate: mx.array,
                residual: mx.array) -> Optional[mx.array]:
    """residual + expert_out + sigmoid(shared_gate) * shared_out in one elementwise pass."""
    shape = expert_out.shape
    if not shape or shared_out.shape != shape or residual.shape != shape:
        return None
    if shared_gate.shape != shape[:-1] + (1,):
        return None
    arrays = (expert_out, shared_out, shared_gate, residual)
    if any(a.dtype not in FLOATS for a in arrays) or expert_out.size >= 2**31:
        return None
    out_dtype = mx.result_type(*arrays)
    W = TUNING["combine"]["W"]
    n = expert_out.size
    (out,) = _launch(
        target, codegen.COMBINE, list(arrays),
        dict(NE=n, HD=shape[-1], W=W, ET=expert_out.dtype, ST=shared_out.dtype,
             GT=shared_gate.dtype, RT=residual.dtype, OutT=out_dtype),
        -(-n // (W * 32)), W * 32, [shape], [out_dtype],
    )
    return out


def gated_delta_step(target: str, q, k, v, g, beta, state) -> Optional[Tuple[mx.array, mx.array]]:
    """One decode step of the gated delta rule; state rows are independent, one per lane group."""
    if q.ndim != 3 or k.shape != q.shape or v.ndim != 3 or state.ndim != 4:
        return None
    B, HK, DK = q.shape
    HV, DV = v.shape[1:]
    if v.shape[0] != B or HV % HK or state.shape != (B, HV, DV, DK) or state.dtype != mx.float32:
        return None
    if g.shape != (B, HV) or beta.shape != (B, HV):
        return None
    if any(a.dtype not in FLOATS for a in (q, k, v, g, beta)) or DK % 4:
        return None
    chunks = DK // 4
    if chunks > 32 and chunks % 32:
        return None
    if chunks < 32 and chunks & (chunks - 1):
        return None
    lpr = min(32, chunks)
    cfg = TUNING["gated_delta"]
    R, W = cfg["R"], cfg["W"]
    rows = B * HV * DV
    rows_tg = W * R * (32 // lpr)
    y, new_state = _launch(
        target, codegen.GATED_DELTA, [q, k, v, g, beta, state],
        dict(B=B, HK=HK, HV=HV, DK=DK, DV=DV, R=R, W=W, QT=q.dtype, KT=k.dtype, VT=v.dtype,
             GT=g.dtype, BT=beta.dtype, OutT=q.dtype),
        -(-rows // rows_tg), W * 32, [(B, HV, DV), state.shape], [q.dtype, mx.float32],
    )
    return y, new_state
