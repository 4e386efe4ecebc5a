"""Planning, compiling (lazily, cached) and launching the generated kernels.

A *plan* fixes everything about one launch (kernel, inputs, template values, grid,
outputs) from the shapes and dtypes alone; ``plan_*`` return ``None`` when a kernel does
not cover the inputs, and the caller takes the reference path. Plans are also what the
off-GPU compile checks (``tools/metal_check``) instantiate, so they check exactly the
template values that run. Launch shapes (row slots per warp ``R``, warps per threadgroup
``W``) come from ``TUNING``; the benchmark overrides them to compare variants.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

from . import codegen, cuda_driver
from .reference import ExpertWeights, Projection

FLOATS = (mx.float32, mx.bfloat16, mx.float16)

# Launch shapes; benchmarks/KERNELS_NOTES.md says how they were chosen.
TUNING: Dict[str, Dict[str, int]] = {
    # v1 projections. R: row slots per warp; W: warps per threadgroup (gate/up); down's
    # warps split the k experts (W = min(k, W_max)). R4 W8 was the fastest gate/up in the
    # H100 sweep (the end-to-end GPU tests ran with R4 W4; same code, other template value).
    "gate_up": {"R": 4, "W": 8},
    "down": {"R": 4, "W_max": 16},
    # v2 (prefetching) projections. R: rows per item; W: warps per threadgroup; tgs:
    # threadgroups per launch, 0 for one per GPU core (SM; 256 where the count is unknown). At
    # 159 registers a thread, an SM holds one threadgroup of 12 warps: one wave, one staging of
    # x per SM (Nsight Compute on an H200, 4-bit k=10: 25.9 us against 29.6 for R1 W4 256).
    # DB: 1 double-buffers gate/up's items (0: half the registers); PF: L2 hints (gate/up: 1-15
    # items ahead, 16 the threadgroup's whole run; down: nonzero). Neither beat these defaults
    # on the H200 (KERNELS_NOTES.md, Run 10). DH: gate/up hints down's rows into L2 once each
    # warp has done (DH - 1) / 8 of its items (0: no hints; CUDA only). 9, after its last item:
    # down 12.0-12.4 us against 13.8-14.4, gate/up unchanged within noise (H200, 4-bit, Run 12).
    # These shapes multiply in float32 (3 instructions a weight); W gives way where the
    # threadgroup would not fit the register file (gate_up_pf_warps).
    "gate_up_pf": {"R": 1, "W": 12, "tgs": 0, "DB": 1, "PF": 0, "DH": 9},
    # down: R rows per iteration (R 2 took 11.9 us against 10.7 for R 1 with its rows mostly in
    # L2, H200, 4-bit k=10, Run 13), tgs threadgroups, PF as above.
    "down_pf": {"R": 1, "tgs": 256, "PF": 0},
    # v2 with half-precision products (HP 1 or 2: pairs of weights times pairs of x in one HFMA2,
    # sources.fm_dot_chunk_hp; HP 0 here: the float32 shapes above), used on CUDA where x is
    # bfloat16 or float16. HP 1 takes 1.1 instructions a weight, HP 2 1.6 and is 2.4-4x more
    # accurate. H200, 4-bit k=10, Run 16: gate/up HP 2 at 16 warps 19.1-19.5 us (HP 1 18.5-19.7,
    # float32 products 23.0-24.7); down HP 1 at R 4 8.6-8.7 us (R 2 / 512 threadgroups 9.4-9.6,
    # HP 2 10.1, float32 10.6-10.8): one call 27.8 us against 33.7-33.8 in the same run.
    "gate_up_hp": {"R": 1, "W": 16, "tgs": 0, "DB": 1, "PF": 0, "DH": 9, "HP": 2},
    "down_hp": {"R": 4, "tgs": 256, "PF": 0, "HP": 1},
    # v6 (gate/up on the matrix units; down is v2's). S: warps that split a row's blocks; WR:
    # items (16 rows) a threadgroup works on at once (W = S * WR warps); PD: blocks each warp has
    # in flight; tgs as v2's; CS: 2 spreads the used B columns over more lanes (1 where the
    # staged x would not fit threadgroup memory); RBM: rounds whose sums wait for one barrier;
    # PF: L2 hints (1-15 rounds ahead, 16 the whole run); XB: 1 stages x once per token in a
    # launch of its own instead of in every threadgroup (H200, 2 bits: gate/up 19.6 us against
    # 23.6 without; KERNELS_NOTES.md, Run 12); DH: down's rows hinted into L2 as by v2's gate/up,
    # counted in rounds (0: at 2 bits it costs gate/up what it saves down, 31.0 us a call against
    # 31.3 with DH 9; Run 14). PD beyond what the register file holds at S * WR warps shrinks
    # the threadgroup (mma_registers).
    "gate_up_mma": {"S": 8, "WR": 2, "PD": 2, "tgs": 0, "CS": 2, "RBM": 8, "PF": 1, "XB": 1, "DH": 0, "MD": 0},
    # v6 with MD 1: down on the matrix units as well (h staged per (token, slot) pair by a launch
    # of its own, then one warp per slot). T: 16-row tiles per threadgroup; PD: blocks each warp
    # has in flight; CS as gate/up's; PD gives way where K warps would not fit the register
    # file. Off: slower than v2's down on an H200 (Run 15, down with its h staging: 4-bit 15.0 us
    # against 11.3, 2-bit 12.9 against 11.4; PD 1 / 4 and T 2 no better).
    "down_mma": {"T": 1, "PD": 2, "CS": 2},
    # v4 (split-K, one launch). C: expert rows per threadgroup; W: warps; R: gate/up rows per
    # item; RD: down rows per lane group and iteration.
    "expert_mlp_sk": {"C": 64, "W": 4, "R": 1, "RD": 2},
    # v5 (v4 with asynchronously staged weights). P: ring stages per warp.
    "expert_mlp_ska": {"C": 64, "W": 4, "R": 1, "RD": 4, "P": 4},
    "combine": {"W": 8},
    "gated_delta": {"R": 2, "W": 4},
}

def load_tuning(text: str) -> None:
    """Merge launch shapes into ``TUNING``: JSON text or the path of a JSON file, e.g.
    ``{"gate_up_pf": {"W": 16, "tgs": 264}}`` (what ``FLASH_MOE_TUNING`` holds at import)."""
    source = "FLASH_MOE_TUNING"
    if not text.lstrip().startswith("{"):
        source = text
        try:
            with open(text) as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f"launch shapes file {source}: {e.strerror}; give JSON text or a readable file") from None
    try:
        shapes = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"launch shapes in {source} are not valid JSON ({e})") from None
    unknown = sorted(set(shapes) - set(TUNING))
    bad = [k for k, v in shapes.items() if k in TUNING and not (
        isinstance(v, dict) and all(isinstance(n, int) and not isinstance(n, bool) for n in v.values()))]
    if unknown or bad:
        raise ValueError(f"launch shapes in {source}: unknown kernels {unknown}, not a name->int mapping {bad}; "
                         f"kernels are {sorted(TUNING)}")
    for kernel, values in shapes.items():
        TUNING[kernel] = {**TUNING[kernel], **values}


if os.environ.get("FLASH_MOE_TUNING"):
    load_tuning(os.environ["FLASH_MOE_TUNING"])

# Which projection kernels run: 1 (the fallback for shapes the others do not cover), 2
# (prefetching, two launches), 4 (split-K in one launch with an atomic sum, not bit-reproducible
# from run to run), 5 (4 with asynchronously staged weights), 6 (gate/up on the matrix units, then
# v2's down; at 4 bits 10% slower than v2 on the H200, Runs 11-12), or "auto" (the default): 2,
# and 6 for one 2-bit token on CUDA (``default_version``). Timed
# one call after the other, as a decode's layers run, v2 is the fastest at every measured size
# on the H100 (4-bit k=10: 61-68 us per call against 90-95 for v4, 82-83 for v5; GPU time alone,
# CUPTI: 43.6 / 65.0 / 57.2 us); v4 only looked faster when independent calls overlapped on the
# GPU (benchmarks/KERNELS_NOTES.md, Run 7).
PROJECTION_VERSION = os.environ.get("FLASH_MOE_PROJECTION", "auto")


def default_version(tokens: int, bits: int = 4, target: str = "cuda") -> int:
    """The projection kernels used for ``tokens`` rows of ``bits``-bit experts on ``target``
    when the caller names no version."""
    if str(PROJECTION_VERSION) != "auto":
        return int(PROJECTION_VERSION)
    # One 2-bit token on CUDA: v6 with x staged once per token (H200, Run 12: 31.4 us of GPU
    # time against v2's 35.3-36.0; at 4 bits v2 stays ahead, 22.3-23.1 against 24.8-26.0 for
    # gate/up). With v2's half-precision products (Run 16), v6's gate/up still leads at 2 bits
    # (19.3 us against 19.9-21.9; its down is v2's, in half precision). Metal: v2 (v6 does not
    # fit 32 KB of threadgroup memory at hidden 4096).
    if tokens == 1 and bits == 2 and target == "cuda":
        return 6
    return 2

# Per-bits overrides of TUNING, keyed (kernel, bits); the benchmark's autotune fills them.
TUNING_BITS: Dict[Tuple[str, int], Dict[str, int]] = {}


def tuning(kernel: str, bits: int = 0) -> Dict[str, int]:
    """Launch shape of ``kernel`` for ``bits``-bit weights."""
    t = TUNING_BITS.get((kernel, bits), TUNING[kernel])
    used = getattr(_planning, "used", None)
    if used is not None:  # this thread is planning a launch for the replay cache
        used.append((kernel, bits, dict(t)))
    return t


_planning = threading.local()  # .used: the launch shapes read while planning, per thread


# Largest token count the projection kernels take; beyond it gather_qmm is used.
MAX_TOKENS = 8

# Threadgroup memory per threadgroup: Metal guarantees 32 KiB, CUDA's static limit is 48 KiB;
# CUDA's dynamic shared memory (v5's ring) may use up to 227 KiB on sm_80/sm_90.
SMEM_LIMIT = {"metal": 32 * 1024, "cuda": 48 * 1024}
DYNAMIC_SMEM_LIMIT = {"metal": 32 * 1024, "cuda": 227 * 1024}

# Value written into every output before a launch (tests poison with NaN to catch
# elements a kernel never writes); None leaves outputs uninitialised.
POISON: Optional[float] = None


def gpu_cores(target: str) -> Optional[int]:
    """Streaming multiprocessors of the CUDA device MLX computes on (None off CUDA or unknown)."""
    cuda = getattr(mx, "cuda", None)
    if target != "cuda" or cuda is None or not cuda.is_available():
        return None
    return cuda_driver.multiprocessors()


@dataclass(frozen=True)
class ArraySpec:
    """Shape and dtype of an array that does not exist yet (or only in a check)."""

    shape: Tuple[int, ...]
    dtype: Any

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class Plan:
    """One launch: ``n_groups`` threadgroups of ``group_size`` threads."""

    spec: codegen.KernelSpec
    inputs: List[Any]
    template: Dict[str, Any]
    n_groups: int
    group_size: int
    out_shapes: List[Tuple[int, ...]]
    out_dtypes: List[Any]
    init_value: Optional[float] = None  # filled into the outputs first (atomic sums need 0)
    shared_memory: int = 0  # bytes of dynamic shared memory (CUDA; Metal declares it statically)


@functools.lru_cache(maxsize=None)
def _kernel(target: str, spec: codegen.KernelSpec, shared_memory: int = 0):
    header, source = codegen.render(spec, target)
    kwargs = dict(name=spec.kernel_name(target), input_names=list(spec.inputs),
                  output_names=list(spec.outputs), source=source, header=header,
                  ensure_row_contiguous=True)
    if target == "metal":
        return mx.fast.metal_kernel(atomic_outputs=spec.atomic_outputs, **kwargs)
    # A CUDA output is a plain pointer, atomics or not. MLX raises a kernel's dynamic shared
    # memory limit itself when the request exceeds 48000 bytes.
    return mx.fast.cuda_kernel(shared_memory=shared_memory, **kwargs)


def run(target: str, plan: Plan) -> List[mx.array]:
    """Launch a plan (compiling its kernel on first use)."""
    return _launch(_step(target, plan), plan.inputs)


def run_all(target: str, plans: Sequence[Plan]) -> List[mx.array]:
    """Launch plans in order, each placeholder input (an ``ArraySpec``) taking the previous
    launch's first output: what ``plan_expert_mlp`` returns. The last launch's outputs."""
    return _run_steps([_step(target, plan) for plan in plans], {})


@functools.lru_cache(maxsize=256)
def count_array(n: int) -> mx.array:
    """A one-element int32 array holding a run-time size (cached: decode repeats sizes)."""
    return mx.array([n], dtype=mx.int32)


@dataclass(frozen=True)
class Arg(ArraySpec):
    """A named stand-in for one of a call's arrays: plans made from stand-ins are kept and
    replayed with the arrays of later calls of the same shapes and dtypes."""

    name: str


_PREV = object()  # the previous launch's first output (an ArraySpec placeholder in a plan)


@dataclass
class _Step:
    kernel: Any
    inputs: List[Any]  # a stand-in's name, _PREV, or a constant array
    template: List[Tuple[str, Any]]
    grid: Tuple[int, int, int]
    threadgroup: Tuple[int, int, int]
    out_shapes: List[Tuple[int, ...]]
    out_dtypes: List[Any]
    init_value: Optional[float]


@dataclass
class _Replay:
    steps: Optional[List[_Step]]  # None: the kernels do not cover these inputs
    tunings: List[Tuple[str, int, Dict[str, int]]]  # the launch shapes the plans were made with


# Planning checks every array's shape and dtype and builds template lists; on the GPU host
# that cost ~20-45 us of Python per MoE call (more than the kernel). A decode step repeats the
# same shapes every layer and token, so plans are made once per signature and replayed.
_replays: Dict[tuple, _Replay] = {}
MAX_REPLAYS = 4096


def _stand_ins(arrays: Dict[str, Any]) -> Dict[str, Arg]:
    return {name: Arg(tuple(a.shape), a.dtype, name) for name, a in arrays.items()}


def _signature(arrays: Dict[str, Any]) -> tuple:
    return tuple((name, a.shape, a.dtype) for name, a in arrays.items())


def _replay(target: str, key: tuple, arrays: Dict[str, Any], make_plans) -> Optional[List[mx.array]]:
    """Run the plans ``make_plans(stand_ins)`` makes for ``arrays``' signature, planning only
    the first time (and again if a launch shape in ``TUNING`` changed since)."""
    key = (target,) + key + _signature(arrays)
    rep = _replays.get(key)
    if rep is None or any(tuning(k, b) != t for k, b, t in rep.tunings):
        _planning.used = used = []
        try:
            plans = make_plans(_stand_ins(arrays))
        finally:
            _planning.used = None
        steps = None if plans is None else [_step(target, plan) for plan in plans]
        if len(_replays) >= MAX_REPLAYS:  # many shapes (prompts of every length): start over
            _replays.clear()
        rep = _replays[key] = _Replay(steps, used)
    return None if rep.steps is None else _run_steps(rep.steps, arrays)


def _run_steps(steps: List[_Step], arrays: Dict[str, Any]) -> List[mx.array]:
    outs = None
    for st in steps:
        outs = _launch(st, [outs[0] if a is _PREV else arrays[a] if isinstance(a, str) else a for a in st.inputs])
    return outs


def _launch(st: _Step, inputs: List[Any]) -> List[mx.array]:
    return st.kernel(inputs=inputs, template=st.template, grid=st.grid, threadgroup=st.threadgroup,
                     output_shapes=st.out_shapes, output_dtypes=st.out_dtypes,
                     init_value=POISON if st.init_value is None else st.init_value)


def _step(target: str, plan: Plan) -> _Step:
    """The plan as a replayable launch: stand-ins by name, placeholders as the previous output."""
    inputs = [a.name if isinstance(a, Arg) else _PREV if isinstance(a, ArraySpec) else a for a in plan.inputs]
    smem = plan.shared_memory if target == "cuda" else 0
    return _Step(_kernel(target, plan.spec, smem), inputs, codegen.template_args(plan.spec, plan.template),
                 (plan.n_groups * plan.group_size, 1, 1), (plan.group_size, 1, 1), plan.out_shapes,
                 plan.out_dtypes, plan.init_value)


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
    lanes = lanes_per_row(dim // epl)
    return None if lanes is None else (epl, lanes)


def lanes_per_row(chunks: int) -> Optional[int]:
    """Lanes that share a row of ``chunks`` lane-sized chunks: 32 when the chunks fill whole
    warps, else all of them if a power of two (several rows then share a warp); None otherwise."""
    if chunks >= 32:
        return 32 if chunks % 32 == 0 else None
    return chunks if chunks & (chunks - 1) == 0 else None


def _proj_ok(p: Projection, rows: int, dim: int, bits: int, gs: int) -> bool:
    if p.scales is None or p.biases is None:
        return False
    if p.weight.dtype != mx.uint32 or p.weight.ndim != 3:
        return False
    if tuple(p.weight.shape[1:]) != (rows, dim * bits // 32):
        return False
    if tuple(p.scales.shape) != tuple(p.weight.shape[:2]) + (dim // gs,):
        return False
    return p.scales.dtype in FLOATS and tuple(p.biases.shape) == tuple(p.scales.shape) \
        and p.biases.dtype == p.scales.dtype


def _halving_fit(rows: int, per_slot: int, pref: int) -> Optional[int]:
    """Largest R <= pref (halving) with rows divisible by R * per_slot, or None: rows per warp,
    blocks in flight, tiles per threadgroup."""
    r = pref
    while r >= 1:
        if rows % (r * per_slot) == 0:
            return r
        r //= 2
    return None


def _gate_up_inputs(x, w: ExpertWeights, inds) -> list:
    return [x, w.gate.weight, w.gate.scales, w.gate.biases, w.up.weight, w.up.scales, w.up.biases, inds]


def _down_inputs(w: ExpertWeights, pairs: int, I: int, inds, scores) -> list:
    """h (a placeholder until gate/up has run: [pairs, I] float32), down's weights, routing."""
    return [ArraySpec((pairs, I), mx.float32), w.down.weight, w.down.scales, w.down.biases, inds, scores]


def _plans_v1(target, x, w, inds, scores, N, D, I, K, sub_d, sub_i, out_dtype):
    """gate/up: W warps x R row slots x SUB rows per threadgroup, one (token, slot) pair each;
    down: R x SUB rows per threadgroup, its W warps split the K experts."""
    bits, gs = w.bits, w.group_size
    tg = tuning("gate_up", bits)
    W = tg["W"]
    while W > 1 and I % (W * sub_d):
        W //= 2
    R = _halving_fit(I, W * sub_d, tg["R"])
    td = tuning("down", bits)
    Wd = min(K, td["W_max"])
    Rd = _halving_fit(D, sub_i, td["R"])
    if R is None or Rd is None:
        return None
    gate_up = Plan(
        codegen.GATE_UP,
        _gate_up_inputs(x, w, inds),
        dict(BITS=bits, GS=gs, D=D, I=I, K=K, R=R, W=W, XT=x.dtype, ST=w.gate.scales.dtype),
        N * K * (I // (W * R * sub_d)), W * 32, [(N * K, I)], [mx.float32],
    )
    down = Plan(
        codegen.DOWN,
        _down_inputs(w, N * K, I, inds, scores),
        dict(BITS=bits, GS=gs, D=I, O=D, K=K, R=Rd, W=Wd, ST=w.down.scales.dtype, RT=scores.dtype,
             OutT=out_dtype),
        N * (D // (Rd * sub_i)), Wd * 32, [(N, D)], [out_dtype],
    )
    return gate_up, down


def _hinting_down_rows(target, dh, spec, inputs, template, w):
    """A gate/up plan's (spec, inputs, template), swapped for the variant that also hints down's
    rows into L2 when DH is set and the target has the hint (CUDA; nothing on Metal)."""
    if not dh or target != "cuda":
        return spec, inputs, template
    return (codegen.DOWN_HINTED[spec], inputs + [w.down.weight, w.down.scales, w.down.biases],
            dict(template, DH=dh))


def _plans_v2(target, x, w, inds, scores, N, D, I, K, sub_d, sub_i, out_dtype):
    """gate/up: the K*I rows of a token in items of R*SUB rows, G threadgroups per token;
    down: one warp per expert (K <= 16), RPT rows per threadgroup."""
    if K > 16:
        return None
    bits, gs = w.bits, w.group_size
    tg, hp = v2_shape(target, "gate_up", bits, x.dtype)
    R = _halving_fit(I, sub_d, tg["R"])
    if R is None:
        return None
    # (shapes set by hand may omit them)
    db, pf, dh = tg.get("DB", 1), tg.get("PF", 0), tg.get("DH", 0)
    if not (0 <= pf <= 16 and db in (0, 1) and 0 <= dh <= 9):
        raise ValueError(f"v2 gate/up launch shape out of range (PF 0-16, DB 0 or 1, DH 0-9): {tg}")
    items = K * I // (R * sub_d)
    # G need not divide the items (a grid that fills the GPU in one wave can beat a divisor);
    # every threadgroup gets items
    tgs = tg["tgs"] or gpu_cores(target) or 256
    run = -(-items // max(1, min(items, tgs // N)))
    G = -(-items // run)
    W = gate_up_pf_warps(tg["W"], bits, hp)
    while W > 1 and W > run:  # no idle warps
        W //= 2
    spec, inputs = codegen.GATE_UP_PF, _gate_up_inputs(x, w, inds)
    template = dict(BITS=bits, GS=gs, D=D, I=I, K=K, R=R, W=W, G=G, DB=db, PF=pf, HP=hp,
                    XT=x.dtype, ST=w.gate.scales.dtype)
    spec, inputs, template = _hinting_down_rows(target, dh, spec, inputs, template, w)
    gate_up = Plan(spec, inputs, template, N * G, W * 32, [(N * K, I)], [mx.float32])
    down = _down_pf_plan(target, x, w, inds, scores, N, D, I, K, sub_i, out_dtype)
    return None if down is None else (gate_up, down)


def v2_shape(target: str, kernel: str, bits: int, x_dtype: mx.Dtype) -> Tuple[Dict[str, int], int]:
    """(launch shape, HP) of v2's ``kernel`` ("gate_up" or "down"): the half-precision shape
    (``TUNING[kernel + "_hp"]``) where it asks for HP 1 or 2, the target is CUDA and the
    model's activations are bfloat16 or float16 (their values are exact in half precision); else
    the float32 shape with HP 0 (Metal: Apple GPUs are not instruction-bound at their bandwidth,
    and whether they keep subnormal halves is not checked)."""
    t = tuning(kernel + "_hp", bits)
    hp = t.get("HP", 0)
    if hp not in (0, 1, 2):
        raise ValueError(f"{kernel}_hp's HP must be 0, 1 or 2: {t}")
    if hp and target == "cuda" and x_dtype in (mx.bfloat16, mx.float16):
        return t, hp
    return tuning(kernel + "_pf", bits), 0


# Registers a thread of v2's gate/up takes (sm_90 ptxas, double-buffered items; KERNELS_NOTES.md,
# Run 16): 8-bit 242-254, float32 products 155-160, half-precision products 95-127.
def gate_up_pf_warps(asked: int, bits: int, hp: int) -> int:
    """The warps of a v2 gate/up threadgroup: as asked, or as many as fit the register file."""
    registers = 256 if bits == 8 else (128 if hp else 160)
    return max(1, min(asked, 65536 // (32 * registers)))


def _down_pf_plan(target, x, w, inds, scores, N, D, I, K, sub_i, out_dtype) -> Optional[Plan]:
    """v2's down: one warp per expert (K <= 16), RPT rows per threadgroup."""
    bits, gs = w.bits, w.group_size
    td, hp = v2_shape(target, "down", bits, x.dtype)
    Rd = _halving_fit(D, sub_i, td["R"])
    pf_down = td.get("PF", 0)
    if pf_down < 0:
        raise ValueError(f"v2 down launch shape out of range (PF >= 0): {td}")
    if Rd is None or K > 16:
        return None
    # rows per threadgroup: the fewest (a multiple of Rd * SUB dividing D) that keep the
    # threadgroup count at or under tgs
    step = Rd * sub_i
    slots = D // step
    m = next(m for m in range(1, slots + 1) if slots % m == 0 and slots // m <= max(1, td["tgs"] // N))
    rpt = step * m
    if 4 * K * rpt > SMEM_LIMIT[target]:
        return None
    down = Plan(
        codegen.DOWN_PF,
        _down_inputs(w, N * K, I, inds, scores),
        dict(BITS=bits, GS=gs, D=I, O=D, K=K, R=Rd, RPT=rpt, PF=pf_down, HP=hp,
             ST=w.down.scales.dtype,
             RT=scores.dtype, OutT=out_dtype),
        N * (D // rpt), K * 32, [(N, D)], [out_dtype],
    )
    return down


# codegen.MMA_LAYOUTS in Python: which B values (k, n) lane l holds, v = 0..3.
def _mma_b_values(target: str, lane: int) -> List[Tuple[int, int]]:
    if target == "metal":
        fr = ((lane // 4) & 4) + ((lane // 2) % 4)
        fc = ((lane // 4) & 2) * 2 + (lane % 2) * 2
        return [(fr + 8 * (v >> 1), fc + (v & 1)) for v in range(4)]
    fr, fc = lane >> 2, (lane & 3) * 2
    return [(fc + (v & 1) + 8 * (v >> 1), fr) for v in range(4)]


def _mma_used_lanes(target: str, used_columns: int, stride: int) -> List[int]:
    return [lane for lane in range(32)
            if any(n % stride == 0 and n // stride < used_columns for _, n in _mma_b_values(target, lane))]


def mma_b_slots(target: str, used_columns: int, stride: int) -> int:
    """Lanes whose B fragment holds a used column (fm_b_slots in the kernel text)."""
    return len(_mma_used_lanes(target, used_columns, stride))


@functools.lru_cache(maxsize=64)
def mma_x_map(target: str, D: int, bits: int, gs: int, pieces: int, stride: int) -> mx.array:
    """Where each value of v6's staged B fragments comes from, [tile][slot][v] int32: element << 4
    | piece << 2 | field place f (x is pre-scaled by 2^-(bits*f)), or -1 for a zero. The inverse
    of how a lane's A registers pair the fields of its own 16-byte chunk (sources_mma)."""
    pack, hp, f_in_place = 32 // bits, 16 // bits, 7 // bits
    epl = 4 * pack
    blk, ng = 4 * epl, 4 * epl // gs
    used = pieces * ng
    codes = []
    for T in range(D // 16):
        bk, j = divmod(T, pack)  # a block has `pack` tiles
        for lane in _mma_used_lanes(target, used, stride):
            for k, n in _mma_b_values(target, lane):
                chunk, pp = (k % 8) // 2, 2 * j + k // 8
                p = pp % hp
                el = bk * blk + chunk * epl + (pp // hp) * pack + p + (k % 2) * hp
                u = n // stride
                ok = n % stride == 0 and u < used and (chunk * epl) // gs == u % ng
                codes.append((el << 4) | ((u // ng) << 2) | (p % f_in_place) if ok else -1)
    return mx.array(codes, dtype=mx.int32)


MMA_PIECES = {mx.bfloat16: 1, mx.float16: 2, mx.float32: 3}  # bfloat16 pieces that hold x exactly


def mma_registers(P: int, PD: int) -> int:
    """Registers a v6 gate/up thread may take with x in P pieces and PD blocks in flight, an upper
    bound: a threadgroup asking more than 64K fails to launch ("too many resources"). sm_90 ptxas
    (`check.py --ptxas`, bits 4 and 2, x staged or not) takes 77-151 at PD 1, 95-184 at PD 2 and
    160-248 at PD 4, growing with P; 32 * (P + PD + 1) is above each."""
    return 32 * (P + PD + 1)


def _plans_v6(target, x, w, inds, scores, N, D, I, K, sub_i, out_dtype):
    """gate/up on the matrix units (16-row items, S warps per item), then v2's down. None where
    it does not apply: 8-bit weights, groups smaller than a lane's chunk, rows not in 16s, or
    the staged x too large for threadgroup memory."""
    bits, gs = w.bits, w.group_size
    if bits not in (2, 4) or I % 16:
        return None
    epl = 128 // bits
    blk = 4 * epl
    if gs % epl or blk % gs or D % blk:
        return None
    t = tuning("gate_up_mma", bits)
    P = MMA_PIECES[x.dtype]
    NU = P * (blk // gs)
    nb = D // blk
    S = max(1, t["S"])
    while nb % S:
        S //= 2
    WR = max(1, t["WR"])

    def blocks_in_flight(S):
        return _halving_fit(nb // S, 1, max(1, min(t["PD"], nb // S)))

    while S * WR * 32 * mma_registers(P, blocks_in_flight(S)) > 65536:  # the threadgroup must fit one SM
        if WR > 1:
            WR //= 2
        elif S > 1:
            S //= 2
        else:
            break
    W = S * WR
    PD = blocks_in_flight(S)
    items = K * I // 16
    tgs = t["tgs"] or gpu_cores(target) or 256
    run = -(-items // max(1, min(items, tgs // N)))
    G = -(-items // run)
    RBM, PF, DH = max(1, t.get("RBM", 8)), t.get("PF", 0), t.get("DH", 0)
    if not (0 <= PF <= 16 and 0 <= DH <= 9):
        raise ValueError(f"v6 launch shape out of range (PF 0-16, DH 0-9): gate_up_mma {t}")
    scratch = max(D, min(RBM, -(-run // (W // S))) * W * 2 * 16)  # floats (the kernel's SCR; D, W even)
    fixed16 = (2 * (D // gs) * P + 3) // 4 + scratch // 4 + 8
    CS = smem = None
    for cs in (t.get("CS", 2), 1, 2):
        if cs in (1, 2) and NU * cs <= 8:
            smem = 16 * (fixed16 + ((D // 16) * mma_b_slots(target, NU, cs) + 1) // 2)
            if smem <= DYNAMIC_SMEM_LIMIT[target]:
                CS = cs
                break
    if CS is None:
        return None
    xmap = mma_x_map(target, D, bits, gs, P, CS)
    template = dict(BITS=bits, GS=gs, D=D, I=I, K=K, W=W, S=S, G=G, PD=PD, P=P, CS=CS, RBM=RBM, PF=PF,
                    XT=x.dtype, ST=w.gate.scales.dtype)
    staged = ()
    if t.get("XB", 0):  # x staged once per token by a first launch; gate/up copies it
        staged = (_mma_staging(codegen.STAGE_X_MMA, x, xmap, bits, gs, P, CS),)
        spec, inputs = codegen.GATE_UP_MMA_XB, _gate_up_inputs(x, w, inds) + [ArraySpec(staged[0].out_shapes[0],
                                                                                         mx.uint32)]
    else:
        spec, inputs = codegen.GATE_UP_MMA, _gate_up_inputs(x, w, inds) + [xmap]
    spec, inputs, template = _hinting_down_rows(target, DH, spec, inputs, template, w)
    gate_up = Plan(spec, inputs, template, N * G, W * 32, [(N * K, I)], [mx.float32], shared_memory=smem)
    down = _down_mma_plans(target, x, w, inds, scores, N, D, I, K, out_dtype) if t.get("MD", 0) else None
    if down is None:  # v2's down
        down = _down_pf_plan(target, x, w, inds, scores, N, D, I, K, sub_i, out_dtype)
        down = None if down is None else (down,)
    return None if down is None else staged + (gate_up,) + down


def _mma_staging(spec: codegen.KernelSpec, x, xmap: mx.array, bits: int, gs: int, P: int, CS: int) -> Plan:
    """fm_stage_x_mma over the rows of x ([rows, D]; an ArraySpec: the previous launch's output):
    each row's B entries and group sums, [rows, words] uint32 in the layout of the kernels'
    threadgroup memory (BS16 + XS16 16-byte units)."""
    rows, D = x.shape
    entries = xmap.size // 4
    words = 4 * ((entries + 1) // 2 + (2 * (D // gs) * P + 3) // 4)
    tpt = max(1, -(-max(entries, 32 * (D // gs) * P) // 256))
    return Plan(spec, [x, xmap], dict(BITS=bits, GS=gs, D=D, P=P, CS=CS, W=8, TPT=tpt, XT=x.dtype),
                rows * tpt, 256, [(rows, words)], [mx.uint32])


def _down_mma_plans(target, x, w, inds, scores, N, D, I, K, out_dtype) -> Optional[Tuple[Plan, Plan]]:
    """Down on the matrix units: h staged per (token, slot) pair (fm_stage_x_mma reading h as
    gate/up writes it), then one warp per slot over 16-row tiles. h goes in as many bfloat16 pieces
    as x's dtype needs (one for bfloat16: h rounded as mlx-lm's bfloat16 SwitchGLU rounds it).
    None where it does not apply (v2's down runs instead)."""
    bits, gs = w.bits, w.group_size
    epl = 128 // bits
    blk = 4 * epl
    if bits not in (2, 4) or gs % epl or blk % gs or I % blk or K > 16:  # (one warp per slot)
        return None
    t = tuning("down_mma", bits)
    T = _halving_fit(D, 16, max(1, t["T"]))
    if T is None:
        return None
    P, nb = MMA_PIECES[x.dtype], I // blk
    NU = P * (blk // gs)
    PD = _halving_fit(nb, 1, max(1, min(t["PD"], nb)))
    while PD > 1 and K * 32 * mma_registers(P, PD) > 65536:  # K warps must fit one SM (PD 8 did not)
        PD //= 2
    for CS in (t.get("CS", 2), 1, 2):
        if CS in (1, 2) and NU * CS <= 8:
            break
    else:
        return None
    stage = _mma_staging(codegen.STAGE_H_MMA, ArraySpec((N * K, I), mx.float32), mma_x_map(target, I, bits, gs, P, CS),
                         bits, gs, P, CS)
    hb = ArraySpec(stage.out_shapes[0], mx.uint32)  # a (token, slot) pair's row: the kernel's STG units
    smem = 16 * (K * hb.shape[1] // 4 + (K * 16 * T + 3) // 4 + 8)
    if smem > DYNAMIC_SMEM_LIMIT[target]:
        return None
    down = Plan(codegen.DOWN_MMA, [hb, w.down.weight, w.down.scales, w.down.biases, inds, scores],
                dict(BITS=bits, GS=gs, D=I, O=D, K=K, T=T, PD=PD, P=P, CS=CS, ST=w.down.scales.dtype,
                     RT=scores.dtype, OutT=out_dtype),
                N * (D // (16 * T)), K * 32, [(N, D)], [out_dtype], shared_memory=smem)
    return stage, down


def _split_k_chunk(I: int, epl: int, pref: int) -> Optional[int]:
    """Expert rows per split-K threadgroup: ``pref`` halved until it divides I (at least one
    lane chunk), or None when its columns of a down row do not split into lanes."""
    C = max(pref, epl)
    while C > epl and I % C:
        C //= 2
    if I % C or C % epl or lanes_per_row(C // epl) != C // epl:
        return None
    return C


def _plan_v4(target, x, w, inds, scores, N, D, I, K, sub_d):
    """One launch: a threadgroup per (token, slot, chunk of C expert rows) computes that
    chunk's gate/up rows, then adds its share of the down projection into y (float32, zeroed
    first) with atomic adds."""
    bits, gs = w.bits, w.group_size
    epl = 128 // bits
    t = tuning("expert_mlp_sk", bits)
    C = _split_k_chunk(I, epl, t["C"])
    if C is None or C % sub_d:
        return None
    R = _halving_fit(C, sub_d, t["R"])
    sub_c = 32 // (C // epl)  # down rows side by side in a warp
    W, RD = t["W"], t["RD"]
    while W * RD * sub_c > D or D % (W * RD * sub_c):
        if RD > 1:
            RD //= 2
        elif W > 1:
            W //= 2
        else:
            return None
    if 4 * (D + D // epl + C) > SMEM_LIMIT[target]:
        return None
    plan = Plan(
        codegen.EXPERT_MLP_SK,
        _gate_up_inputs(x, w, inds) + [w.down.weight, w.down.scales, w.down.biases, scores],
        dict(BITS=bits, GS=gs, D=D, I=I, K=K, C=C, W=W, R=R, RD=RD, XT=x.dtype, ST=w.gate.scales.dtype,
             RT=scores.dtype),
        N * K * (I // C), W * 32, [(N, D)], [mx.float32], init_value=0.0,
    )
    return (plan,)


def _plan_v5(target, x, w, inds, scores, N, D, I, K, sub_d):
    """v4's threadgroups with each warp's weights staged through a ring of P stages in
    threadgroup memory (asynchronous copies on CUDA). Needs whole-warp gate/up rows and
    16-byte rows of scales; the ring lives in dynamic shared memory on CUDA."""
    bits, gs = w.bits, w.group_size
    epl = 128 // bits
    st_size = w.gate.scales.dtype.size
    if sub_d != 1 or (D // gs) * st_size % 16 or w.down.scales.dtype.size != st_size:
        return None
    t = tuning("expert_mlp_ska", bits)
    C = _split_k_chunk(I, epl, t["C"])
    if C is None:
        return None
    R = _halving_fit(C, 1, t["R"])
    W = t["W"]
    while W > 1 and (C // R) % W:
        W //= 2
    sub_c = 32 // (C // epl)
    RD, P = t["RD"], max(2, t["P"])
    while W * RD * sub_c > D or D % (W * RD * sub_c):
        if RD > 1:
            RD //= 2
        else:
            return None
    nstep = D // (32 * epl)
    slot16 = max(R * nstep * 2 * 32 + 4 * R * (D // gs) * st_size // 16, RD * 32 + RD * 16)
    head16 = D // 4 + (D // epl + C + 3) // 4
    smem = 16 * (head16 + W * P * slot16)
    if smem > DYNAMIC_SMEM_LIMIT[target]:
        return None
    plan = Plan(
        codegen.EXPERT_MLP_SKA,
        _gate_up_inputs(x, w, inds) + [w.down.weight, w.down.scales, w.down.biases, scores],
        dict(BITS=bits, GS=gs, D=D, I=I, K=K, C=C, W=W, R=R, RD=RD, P=P, XT=x.dtype, ST=w.gate.scales.dtype,
             RT=scores.dtype),
        N * K * (I // C), W * 32, [(N, D)], [mx.float32], init_value=0.0, shared_memory=smem,
    )
    return (plan,)


def plan_expert_mlp(target: str, x, w: ExpertWeights, inds, scores,
                    combine: Optional[Sequence[Any]] = None,
                    version: Optional[int] = None,
                    out_dtype: Optional[Any] = None) -> Optional[Tuple[Plan, ...]]:
    """Launch plans, run in order, for gate/up + SwiGLU, down + routing weights + k-way sum.

    Versions 1, 2 and 6: two plans (gate/up into h, then down; v6 with XB: a staging plan
    first); a plan's ``ArraySpec`` input is a placeholder for the previous plan's output.
    Version 4: one plan whose output is a float32 accumulator (``expert_mlp`` casts it).
    ``combine`` = (shared_out, shared_gate, residual) fuses ``moe_combine`` into the down launch
    of v1, v2 and v6, and adds it as a last launch to v4's (it casts the sum back). ``inds`` must
    be int32. ``version`` picks the projection kernels (default ``default_version``).
    ``out_dtype`` (without a combine): what v1's and v2's down kernel writes (default x's dtype;
    v4 and v5 always write a float32 sum).
    """
    if not w.quantized or w.bits not in (2, 4, 8) or w.group_size not in (32, 64, 128):
        return None
    if x.ndim != 2 or inds.ndim != 2 or tuple(scores.shape) != tuple(inds.shape):
        return None
    N, D = x.shape
    K = inds.shape[1]
    if N != inds.shape[0] or N > MAX_TOKENS or not 1 <= K <= 32 or inds.dtype != mx.int32:
        return None
    if x.dtype not in FLOATS or scores.dtype not in FLOATS or w.gate.weight.ndim != 3:
        return None
    if out_dtype is not None and out_dtype not in FLOATS:
        return None
    bits, gs = w.bits, w.group_size
    I = w.gate.weight.shape[1]
    lay_d, lay_i = proj_layout(D, bits), proj_layout(I, bits)
    if lay_d is None or lay_i is None or gs % lay_d[0] or D % gs or I % gs:
        return None
    if not (_proj_ok(w.gate, I, D, bits, gs) and _proj_ok(w.up, I, D, bits, gs)
            and _proj_ok(w.down, D, I, bits, gs)) or w.up.scales.dtype != w.gate.scales.dtype:
        return None
    epl, lpr_d = lay_d
    if 4 * (D + D // epl) > SMEM_LIMIT[target]:
        return None

    sub_d, sub_i = 32 // lpr_d, 32 // lay_i[1]
    version = default_version(N, w.bits, target) if version is None else version
    plans = None
    if version == 5:
        plans = _plan_v5(target, x, w, inds, scores, N, D, I, K, sub_d)
        if plans is None:  # shapes v5 does not cover: v4 (then v1)
            version = 4
    if version == 4:
        plans = _plan_v4(target, x, w, inds, scores, N, D, I, K, sub_d)
    elif version == 6:
        plans = _plans_v6(target, x, w, inds, scores, N, D, I, K, sub_i, out_dtype or x.dtype)
        if plans is None:  # shapes v6 does not cover: v2 (then v1)
            version = 2
    if version == 2:
        plans = _plans_v2(target, x, w, inds, scores, N, D, I, K, sub_d, sub_i, out_dtype or x.dtype)
    if plans is None:  # v1 covers shapes the others do not (and is the fallback)
        version, plans = 1, _plans_v1(target, x, w, inds, scores, N, D, I, K, sub_d, sub_i, out_dtype or x.dtype)
    if plans is None:
        return None
    if combine is not None:
        shared_out, shared_gate, residual = combine
        if (tuple(shared_out.shape) != (N, D) or tuple(residual.shape) != (N, D)
                or tuple(shared_gate.shape) != (N, 1) or shared_out.dtype != residual.dtype
                or shared_out.dtype not in FLOATS or shared_gate.dtype not in FLOATS):
            return None
        out_dtype = mx.result_type(x.dtype, shared_out.dtype, shared_gate.dtype)
        if version in (4, 5):  # the combine kernel also casts the float32 sum back
            comb = plan_moe_combine(target, ArraySpec((N, D), mx.float32), shared_out, shared_gate, residual,
                                    out_dtype=out_dtype)
            return None if comb is None else plans + (comb,)
        last = plans[-1]
        last.spec = {codegen.DOWN: codegen.DOWN_COMBINE, codegen.DOWN_PF: codegen.DOWN_COMBINE_PF,
                     codegen.DOWN_MMA: codegen.DOWN_COMBINE_MMA}[last.spec]
        last.inputs += [shared_out, shared_gate, residual]
        last.template.update(CT=shared_out.dtype, GT=shared_gate.dtype, OutT=out_dtype)
        last.out_dtypes = [out_dtype]
    return plans


def expert_mlp(target: str, x: mx.array, w: ExpertWeights, inds: mx.array, scores: mx.array,
               combine: Optional[Sequence[mx.array]] = None, version: Optional[int] = None,
               out_dtype: Optional[mx.Dtype] = None) -> Optional[mx.array]:
    """Run the projection kernels (and the combine, if given); None when they do not cover
    the inputs. The result is in ``out_dtype``, by default x's (or the combine's) dtype."""
    if not w.quantized or x.ndim != 2 or x.shape[0] > MAX_TOKENS:  # (a prompt chunk: gather_qmm)
        return None
    if inds.dtype != mx.int32:
        inds = inds.astype(mx.int32)
    arrays = {"x": x, "inds": inds, "scores": scores}
    for pname in ("gate", "up", "down"):
        p = getattr(w, pname)
        if p.scales is None or p.biases is None:
            return None
        arrays.update({pname + ".weight": p.weight, pname + ".scales": p.scales, pname + ".biases": p.biases})
    if combine is not None:
        arrays.update(shared_out=combine[0], shared_gate=combine[1], residual=combine[2])
    version = default_version(x.shape[0], w.bits, target) if version is None else version

    def make_plans(a: Dict[str, Arg]):
        sw = ExpertWeights(*(Projection(a[n + ".weight"], a[n + ".scales"], a[n + ".biases"])
                             for n in ("gate", "up", "down")), w.bits, w.group_size)
        comb = None if combine is None else (a["shared_out"], a["shared_gate"], a["residual"])
        return plan_expert_mlp(target, a["x"], sw, a["inds"], a["scores"], comb, version,
                               out_dtype if combine is None else None)

    outs = _replay(target, ("expert_mlp", version, w.bits, w.group_size, out_dtype), arrays, make_plans)
    if outs is None:
        return None
    y = outs[0]
    if out_dtype is None:
        out_dtype = x.dtype if combine is None else mx.result_type(x.dtype, combine[0].dtype, combine[1].dtype)
    return y if y.dtype == out_dtype else y.astype(out_dtype)


def plan_moe_combine(target: str, expert_out, shared_out, shared_gate, residual,
                     out_dtype: Optional[mx.Dtype] = None) -> Optional[Plan]:
    """Elementwise residual + expert_out + sigmoid(shared_gate) * shared_out, written in
    ``out_dtype`` (default: the inputs' result type)."""
    shape = tuple(expert_out.shape)
    if not shape or tuple(shared_out.shape) != shape or tuple(residual.shape) != shape:
        return None
    if tuple(shared_gate.shape) != shape[:-1] + (1,):
        return None
    arrays = [expert_out, shared_out, shared_gate, residual]
    if any(a.dtype not in FLOATS for a in arrays) or expert_out.size >= 2**31:
        return None
    if out_dtype is None:
        out_dtype = mx.result_type(*(a.dtype for a in arrays))
    if out_dtype not in FLOATS:
        return None
    W = tuning("combine")["W"]
    n = expert_out.size
    count = count_array(n)
    return Plan(
        codegen.COMBINE, arrays + [count],
        dict(HD=shape[-1], W=W, ET=expert_out.dtype, ST=shared_out.dtype, GT=shared_gate.dtype,
             RT=residual.dtype, OutT=out_dtype),
        -(-n // (W * 32)), W * 32, [shape], [out_dtype],
    )


def moe_combine(target: str, expert_out, shared_out, shared_gate, residual,
                out_dtype: Optional[mx.Dtype] = None) -> Optional[mx.array]:
    arrays = dict(expert_out=expert_out, shared_out=shared_out, shared_gate=shared_gate, residual=residual)

    def make_plans(a: Dict[str, Arg]):
        plan = plan_moe_combine(target, a["expert_out"], a["shared_out"], a["shared_gate"], a["residual"], out_dtype)
        return None if plan is None else [plan]

    outs = _replay(target, ("moe_combine", out_dtype), arrays, make_plans)
    return None if outs is None else outs[0]


def plan_gated_delta_step(target: str, q, k, v, g, beta, state) -> Optional[Plan]:
    """One decode step of the gated delta rule; state rows are independent, one per lane group."""
    if q.ndim != 3 or tuple(k.shape) != tuple(q.shape) or v.ndim != 3 or state.ndim != 4:
        return None
    B, HK, DK = q.shape
    HV, DV = v.shape[1:]
    if v.shape[0] != B or HV % HK or tuple(state.shape) != (B, HV, DV, DK) or state.dtype != mx.float32:
        return None
    if tuple(g.shape) != (B, HV) or tuple(beta.shape) != (B, HV):
        return None
    if any(a.dtype not in FLOATS for a in (q, k, v, g, beta)) or DK % 4:
        return None
    lpr = lanes_per_row(DK // 4)
    if lpr is None:
        return None
    t = tuning("gated_delta")
    R, W = t["R"], t["W"]
    rows_tg = W * R * (32 // lpr)
    return Plan(
        codegen.GATED_DELTA, [q, k, v, g, beta, state],
        dict(B=B, HK=HK, HV=HV, DK=DK, DV=DV, R=R, W=W, QT=q.dtype, KT=k.dtype, VT=v.dtype,
             GT=g.dtype, BT=beta.dtype, OutT=q.dtype),
        -(-(B * HV * DV) // rows_tg), W * 32, [(B, HV, DV), tuple(state.shape)], [q.dtype, mx.float32],
    )


def gated_delta_step(target: str, q, k, v, g, beta, state) -> Optional[Tuple[mx.array, mx.array]]:
    arrays = dict(q=q, k=k, v=v, g=g, beta=beta, state=state)

    def make_plans(a: Dict[str, Arg]):
        plan = plan_gated_delta_step(target, a["q"], a["k"], a["v"], a["g"], a["beta"], a["state"])
        return None if plan is None else [plan]

    outs = _replay(target, ("gated_delta_step",), arrays, make_plans)
    if outs is None:
        return None
    y, new_state = outs
    return y, new_state
