"""Turns one algorithm text into a Metal and a CUDA kernel source.

A kernel body (``sources.py``) is written once against a few ``FM_*`` macros and
``fm_*`` index variables. For each target this module adds:

* a header prelude: the macros (address spaces, threadgroup memory, barrier, warp
  shuffle, bit cast, exp, inline) followed by the shared helper functions;
* a body prelude: the thread/threadgroup/lane/warp indices from the target's built-ins.

``render(spec, target)`` gives the ``(header, source)`` pair that ``mx.fast.metal_kernel``
or ``mx.fast.cuda_kernel`` takes. ``metal_translation_unit`` and ``cuda_translation_unit``
rebuild the complete source that MLX 0.32 compiles around them (the function signature it
writes from the input/output names, dtypes and template arguments), so the generated code
can be compiled on a machine without the GPU: clang against a Metal shim
(``tools/metal_check``), nvcc for CUDA.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import mlx.core as mx

from . import sources, sources_mma, sources_prefetch, sources_splitk

TARGETS = ("metal", "cuda")

# Which lane holds which element of the matrix-unit fragments (v6), per target (also what the
# CPU simulator builds the kernels with, and what launch.mma_x_map mirrors).
MMA_LAYOUTS = {
    "metal": r"""
#define FM_MMA_FR(l) ((((l) / 4) & 4) + (((l) / 2) % 4))
#define FM_MMA_FC(l) ((((l) / 4) & 2) * 2 + ((l) % 2) * 2)
#define FM_MMA_BK(l, v) (FM_MMA_FR(l) + 8 * ((v) >> 1))
#define FM_MMA_BN(l, v) (FM_MMA_FC(l) + ((v) & 1))
#define FM_MMA_XOR0 1
#define FM_MMA_XOR1 8
""",
    "cuda": r"""
#define FM_MMA_FR(l) ((l) >> 2)
#define FM_MMA_FC(l) (((l) & 3) * 2)
#define FM_MMA_BK(l, v) (FM_MMA_FC(l) + ((v) & 1) + 8 * ((v) >> 1))
#define FM_MMA_BN(l, v) FM_MMA_FR(l)
#define FM_MMA_XOR0 1
#define FM_MMA_XOR1 2
""",
}

METAL_MACROS = r"""
// ---- flash-moe target prelude: Metal ----
#define FM_INLINE inline
#define FM_DEVICE device
#define FM_THREAD thread
#define FM_SHARED threadgroup
#define FM_BARRIER() metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup)
#define FM_SHFL_XOR(v, m) metal::simd_shuffle_xor((v), (ushort)(m))
#define FM_AS_FLOAT(u) as_type<float>(u)
#define FM_EXP(v) metal::exp(v)
#define FM_ATOMIC_ADD(p, v) metal::atomic_fetch_add_explicit((p), (v), metal::memory_order_relaxed)
// Staging through threadgroup memory (v5): Metal has no asynchronous global->threadgroup copy,
// so a copy is a plain load and store, and commit/wait have nothing to do.
#define FM_TG threadgroup
#define FM_RING(T, name, count) threadgroup T name[count]
#define FM_WARP_SYNC() metal::simdgroup_barrier(metal::mem_flags::mem_threadgroup)
#define FM_CP_ASYNC16(dst, src) (*(dst) = *(src))
#define FM_CP_ASYNC4(dst, src) (*(dst) = *(src))
#define FM_CP_COMMIT()
#define FM_CP_WAIT(n)
#define FM_AND_OR(a, b, c) (((a) & (b)) | (c))
// Apple GPUs have no prefetch-to-cache instruction: an L2 hint is nothing.
#define FM_PREFETCH_L2(p, bytes) ((void)0)
#define FM_AS_UINT(f) as_type<uint32_t>(f)
// Half-precision pairs (HP): two halves in a uint32 (the first in the low 16 bits).
#define FM_H2 half2
#define FM_H2_BITS(u) as_type<half2>(uint32_t(u))
#define FM_H2_FMA(a, b, c) metal::fma((a), (b), (c))
inline uint32_t fm_h2_pack(float lo, float hi) {  // rounded to nearest even
  half2 v;
  v.x = half(lo);
  v.y = half(hi);
  return as_type<uint32_t>(v);
}
inline float fm_h2_sum(half2 v) {
  return float(v.x) + float(v.y);
}
// Matrix units (v6): one 16x16 (A) times 16x8 (B) product with float accumulation, made of four
// 8x8 simdgroup matrices. Lane l holds A[FR][FC..FC+1], A[FR+8][..], A[FR][FC+8..FC+9], A[FR+8][..]
// (each a pair of bfloat16 in a uint32, the lower column in the low half) and C[FR][FC..FC+1],
// C[FR+8][FC..FC+1]; its B values v = 0..3 sit at (FM_MMA_BK, FM_MMA_BN). The four lanes that
// hold a row are lane ^ FM_MMA_XOR0, ^ FM_MMA_XOR1 and the XOR of both.
""" + MMA_LAYOUTS["metal"] + r"""#define FM_MMA(c, a, b) fm_mma((c), (a), (b))
inline float2 fm_float2(float a, float b) {
  float2 v;
  v.x = a;
  v.y = b;
  return v;
}
inline float2 fm_bf16x2(uint32_t u) {  // exact: a bfloat16 is the top half of a float
  return fm_float2(as_type<float>(u << 16), as_type<float>(u & 0xFFFF0000u));
}
inline void fm_mma(thread float* c, thread const uint32_t* a, thread const uint32_t* b) {
  metal::simdgroup_float8x8 a00, a10, a01, a11, b0, b1, c0, c1;
  reinterpret_cast<thread float2&>(a00.thread_elements()) = fm_bf16x2(a[0]);
  reinterpret_cast<thread float2&>(a10.thread_elements()) = fm_bf16x2(a[1]);
  reinterpret_cast<thread float2&>(a01.thread_elements()) = fm_bf16x2(a[2]);
  reinterpret_cast<thread float2&>(a11.thread_elements()) = fm_bf16x2(a[3]);
  reinterpret_cast<thread float2&>(b0.thread_elements()) = fm_bf16x2(b[0]);
  reinterpret_cast<thread float2&>(b1.thread_elements()) = fm_bf16x2(b[1]);
  reinterpret_cast<thread float2&>(c0.thread_elements()) = fm_float2(c[0], c[1]);
  reinterpret_cast<thread float2&>(c1.thread_elements()) = fm_float2(c[2], c[3]);
  metal::simdgroup_multiply_accumulate(c0, a00, b0, c0);
  metal::simdgroup_multiply_accumulate(c0, a01, b1, c0);
  metal::simdgroup_multiply_accumulate(c1, a10, b0, c1);
  metal::simdgroup_multiply_accumulate(c1, a11, b1, c1);
  const float2 lo = reinterpret_cast<thread float2&>(c0.thread_elements());
  const float2 hi = reinterpret_cast<thread float2&>(c1.thread_elements());
  c[0] = lo.x;
  c[1] = lo.y;
  c[2] = hi.x;
  c[3] = hi.y;
}
"""

CUDA_MACROS = r"""
// ---- flash-moe target prelude: CUDA ----
#define FM_INLINE __device__ __forceinline__
#define FM_DEVICE
#define FM_THREAD
#define FM_SHARED __shared__
#define FM_BARRIER() __syncthreads()
#define FM_SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m))
#define FM_AS_FLOAT(u) __uint_as_float(u)
#define FM_EXP(v) expf(v)
#define FM_ATOMIC_ADD(p, v) atomicAdd((p), (v))
// Staging through shared memory (v5): cp.async copies (sm_80+) that hold no registers while
// in flight; a thread waits for its own groups, and the warp syncs before reading others'.
// The ring is the kernel's dynamic shared memory (the launch passes its size).
#define FM_TG
#define FM_RING(T, name, count) extern __shared__ T name[]
#define FM_WARP_SYNC() __syncwarp()
#define FM_CP_ASYNC16(dst, src) fm_cp_async16((dst), (src))
#define FM_CP_ASYNC4(dst, src) fm_cp_async4((dst), (src))
#define FM_CP_COMMIT() asm volatile("cp.async.commit_group;\n" ::: "memory")
#define FM_CP_WAIT(n) asm volatile("cp.async.wait_group %0;\n" ::"n"(n) : "memory")
FM_INLINE void fm_cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"
               ::"r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src) : "memory");
}
FM_INLINE void fm_cp_async4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n"
               ::"r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src) : "memory");
}
// (a & b) | c in one LOP3 instruction: with two immediate operands the compiler may emit an AND
// and an OR, and that is once per dequantized element.
#define FM_AND_OR(a, b, c) fm_and_or((a), (b), (c))
FM_INLINE uint32_t fm_and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
// L2 hint: a bulk prefetch (sm_90+) of the 16-byte-aligned part of [p, p + bytes), which holds
// no registers while in flight. Nothing on older GPUs.
#define FM_PREFETCH_L2(p, bytes) fm_prefetch_l2((const void*)(p), (unsigned long long)(bytes))
FM_INLINE void fm_prefetch_l2(const void* p, unsigned long long bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const unsigned long long a = (__cvta_generic_to_global(p) + 15ull) & ~15ull;
  const unsigned long long e = (__cvta_generic_to_global(p) + bytes) & ~15ull;
  if (e > a) {
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(a), "r"((unsigned)(e - a)) : "memory");
  }
#endif
}
#define FM_AS_UINT(f) __float_as_uint(f)
// Half-precision pairs (HP): two halves in a uint32 (the first in the low 16 bits); one HFMA2
// multiplies and adds both. Subnormal halves are kept (no flush to zero in half arithmetic).
#define FM_H2 __half2
#define FM_H2_BITS(u) fm_h2_bits(u)
#define FM_H2_FMA(a, b, c) __hfma2((a), (b), (c))
FM_INLINE __half2 fm_h2_bits(uint32_t u) {
  return *reinterpret_cast<const __half2*>(&u);
}
FM_INLINE uint32_t fm_h2_pack(float lo, float hi) {  // rounded to nearest even
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
FM_INLINE float fm_h2_sum(__half2 v) {
  const float2 f = __half22float2(v);
  return f.x + f.y;
}
// Matrix units (v6): mma.sync m16n8k16, bfloat16 inputs, float32 accumulation (sm_80+). Lane l
// holds A[FR][FC..FC+1], A[FR+8][..], A[FR][FC+8..FC+9], A[FR+8][..] (pairs of bfloat16 in a
// uint32, the lower column in the low half) and C[FR][FC..FC+1], C[FR+8][FC..FC+1]; its B values
// v = 0..3 sit at (FM_MMA_BK, FM_MMA_BN). The four lanes that hold a row are lane ^ FM_MMA_XOR0,
// ^ FM_MMA_XOR1 and the XOR of both.
""" + MMA_LAYOUTS["cuda"] + r"""#define FM_MMA(c, a, b) fm_mma((c), (a), (b))
FM_INLINE void fm_mma(float* c, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
"""

# Metal's wrapper declares a built-in only when its name appears in the body, so the
# indices are read here, in the body, not in header macros.
METAL_BODY_PRELUDE = r"""
  const int fm_tg = int(threadgroup_position_in_grid.x);
  const int fm_tid = int(thread_position_in_threadgroup.x);
  const int fm_lane = int(thread_index_in_simdgroup);
  const int fm_warp = int(simdgroup_index_in_threadgroup);
"""

CUDA_BODY_PRELUDE = r"""
  const int fm_tg = int(blockIdx.x);
  const int fm_tid = int(threadIdx.x);
  const int fm_lane = fm_tid & 31;
  const int fm_warp = fm_tid >> 5;
"""

_MACROS = {"metal": METAL_MACROS, "cuda": CUDA_MACROS}
_BODY_PRELUDES = {"metal": METAL_BODY_PRELUDE, "cuda": CUDA_BODY_PRELUDE}


@dataclass(frozen=True)
class KernelSpec:
    """One kernel: its algorithm text and the names MLX puts in the signature.

    ``template`` lists the template parameter names in the order they are passed
    (ints and dtypes). Every input's dtype must be one of them (or fixed): the CUDA
    backend caches a compiled kernel by its name and template values only. ``defines`` are
    ``#define``s placed before the helpers (used for compile-time variants that change the
    signature, such as the fused combine). ``atomic_outputs``: the outputs are only touched
    through ``FM_ATOMIC_ADD`` (Metal declares them ``device atomic<T>*``).
    """

    name: str
    inputs: Tuple[str, ...]
    outputs: Tuple[str, ...]
    body: str
    template: Tuple[str, ...]
    defines: Tuple[Tuple[str, str], ...] = field(default_factory=tuple)
    atomic_outputs: bool = False

    def header(self, target: str) -> str:
        defs = "".join(f"#define {k} {v}\n" for k, v in self.defines)
        return _MACROS[target] + defs + sources.HELPERS

    def source(self, target: str) -> str:
        return _BODY_PRELUDES[target] + self.body

    def kernel_name(self, target: str) -> str:
        """Name with a hash of the full text: MLX caches compiled kernels by name
        (the CUDA backend also on disk), so a changed text must get a new name."""
        digest = hashlib.sha1((self.header(target) + self.source(target)).encode()).hexdigest()[:10]
        return f"fm_{self.name}_{digest}"


def render(spec: KernelSpec, target: str) -> Tuple[str, str]:
    """(header, source) for ``mx.fast.metal_kernel`` / ``mx.fast.cuda_kernel``."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}")
    return spec.header(target), spec.source(target)


_PROJ_INPUTS = ("x", "wg", "sg", "bg", "wu", "su", "bu", "inds")

_DOWN_INPUTS = ("h", "wd", "sd", "bd", "inds", "scores")
_COMBINE_INPUTS = ("shared_out", "shared_gate", "residual")

# Projection kernels, v1 (the fallback for shapes v2 does not cover).
GATE_UP = KernelSpec(
    name="gate_up",
    inputs=_PROJ_INPUTS,
    outputs=("h",),
    body=sources.GATE_UP,
    template=("BITS", "GS", "D", "I", "K", "R", "W", "XT", "ST"),
)


def _down_pair(suffix: str, body: str, template: Tuple[str, ...],
               inputs: Tuple[str, ...] = _DOWN_INPUTS) -> Tuple[KernelSpec, KernelSpec]:
    """A down-projection kernel alone and with ``moe_combine`` fused into it (FM_COMBINE)."""
    alone = KernelSpec(name="down" + suffix, inputs=inputs, outputs=("y",), body=body,
                       template=template, defines=(("FM_COMBINE", "0"),))
    fused = KernelSpec(name="down_combine" + suffix, inputs=inputs + _COMBINE_INPUTS, outputs=("y",),
                       body=body, template=template + ("CT", "GT"), defines=(("FM_COMBINE", "1"),))
    return alone, fused


DOWN, DOWN_COMBINE = _down_pair("", sources.DOWN, ("BITS", "GS", "D", "O", "K", "R", "W", "ST", "RT", "OutT"))

# Projection kernels, v2 (prefetching; the default but for one 2-bit token on CUDA, see launch.default_version).
GATE_UP_PF = KernelSpec(
    name="gate_up_pf",
    inputs=_PROJ_INPUTS,
    outputs=("h",),
    body=sources_prefetch.GATE_UP_PF,
    template=("BITS", "GS", "D", "I", "K", "R", "W", "G", "DB", "PF", "HP", "XT", "ST"),
)


def _with_down_hints(spec: KernelSpec) -> KernelSpec:
    """A gate/up kernel that also hints down's rows into L2 (template int DH, inputs wd, sd, bd;
    sources_prefetch.DOWN_L2_HINTS). CUDA only: Metal has no such hint."""
    return replace(spec, name=spec.name + "_dh", inputs=spec.inputs + ("wd", "sd", "bd"),
                   template=spec.template + ("DH",), defines=spec.defines + (("FM_DOWN_HINT", "1"),))


GATE_UP_PF_DH = _with_down_hints(GATE_UP_PF)
DOWN_PF, DOWN_COMBINE_PF = _down_pair("_pf", sources_prefetch.DOWN_PF,
                                      ("BITS", "GS", "D", "O", "K", "R", "RPT", "PF", "HP", "ST", "RT", "OutT"))
# v6: gate/up on the matrix units (down is v2's); each threadgroup stages x itself, or (XB) a
# first launch stages it once per token and gate/up copies it.
_MMA_TEMPLATE = ("BITS", "GS", "D", "I", "K", "W", "S", "G", "PD", "P", "CS", "RBM", "PF", "XT", "ST")
GATE_UP_MMA = KernelSpec(name="gate_up_mma", inputs=_PROJ_INPUTS + ("xmap",), outputs=("h",),
                         body=sources_mma.GATE_UP_MMA, template=_MMA_TEMPLATE, defines=(("FM_XB", "0"),))
GATE_UP_MMA_XB = KernelSpec(name="gate_up_mma_xb", inputs=_PROJ_INPUTS + ("xb",), outputs=("h",),
                            body=sources_mma.GATE_UP_MMA, template=_MMA_TEMPLATE, defines=(("FM_XB", "1"),))
GATE_UP_MMA_DH, GATE_UP_MMA_XB_DH = _with_down_hints(GATE_UP_MMA), _with_down_hints(GATE_UP_MMA_XB)
# Each gate/up kernel and its variant that hints down's rows (launch plans swap one for the other).
DOWN_HINTED = {GATE_UP_PF: GATE_UP_PF_DH, GATE_UP_MMA: GATE_UP_MMA_DH, GATE_UP_MMA_XB: GATE_UP_MMA_XB_DH}
STAGE_X_MMA = KernelSpec(name="stage_x_mma", inputs=("x", "xmap"), outputs=("xb",), body=sources_mma.STAGE_X_MMA,
                         template=("BITS", "GS", "D", "P", "CS", "W", "TPT", "XT"), defines=(("FM_FROM_H", "0"),))
# Down on the matrix units (v6 with MD): h staged per (token, slot) pair by the same staging text,
# reading h as gate/up writes it.
STAGE_H_MMA = replace(STAGE_X_MMA, name="stage_h_mma", defines=(("FM_FROM_H", "1"),))
DOWN_MMA, DOWN_COMBINE_MMA = _down_pair("_mma", sources_mma.DOWN_MMA,
                                        ("BITS", "GS", "D", "O", "K", "T", "PD", "P", "CS", "ST", "RT", "OutT"),
                                        ("hb",) + _DOWN_INPUTS[1:])  # hb: the staged h (uint32 words)
# Split-K expert MLP, v4: one launch, gate/up and down per chunk of expert rows, atomic sum.
EXPERT_MLP_SK = KernelSpec(
    name="expert_mlp_sk", inputs=_PROJ_INPUTS + ("wd", "sd", "bd", "scores"), outputs=("y",),
    body=sources_splitk.EXPERT_MLP_SK,
    template=("BITS", "GS", "D", "I", "K", "C", "W", "R", "RD", "XT", "ST", "RT"), atomic_outputs=True,
)
# v5: v4 with each warp's weights staged through threadgroup memory by asynchronous copies.
EXPERT_MLP_SKA = KernelSpec(
    name="expert_mlp_ska", inputs=EXPERT_MLP_SK.inputs, outputs=("y",),
    body=sources_splitk.EXPERT_MLP_SKA,
    template=("BITS", "GS", "D", "I", "K", "C", "W", "R", "RD", "P", "XT", "ST", "RT"), atomic_outputs=True,
)
COMBINE = KernelSpec(
    name="combine",
    inputs=("expert_out", "shared_out", "shared_gate", "residual", "params"),
    outputs=("out",),
    body=sources.COMBINE,
    template=("HD", "W", "ET", "ST", "GT", "RT", "OutT"),
)
GATED_DELTA = KernelSpec(
    name="gated_delta",
    inputs=("q", "k", "v", "g", "beta", "state"),
    outputs=("y", "state_out"),
    body=sources.GATED_DELTA,
    template=("B", "HK", "HV", "DK", "DV", "R", "W", "QT", "KT", "VT", "GT", "BT", "OutT"),
)

ALL_SPECS: Tuple[KernelSpec, ...] = (GATE_UP, DOWN, DOWN_COMBINE, GATE_UP_PF, GATE_UP_PF_DH, DOWN_PF, DOWN_COMBINE_PF,
                                     GATE_UP_MMA,
                                     GATE_UP_MMA_XB, GATE_UP_MMA_DH, GATE_UP_MMA_XB_DH, STAGE_X_MMA,
                                     STAGE_H_MMA, DOWN_MMA, DOWN_COMBINE_MMA,
                                     EXPERT_MLP_SK, EXPERT_MLP_SKA, COMBINE, GATED_DELTA)


# --------------------------------------------------------------------------------------
# Full translation units, as MLX 0.32 assembles them (for compile checks off the GPU).
# --------------------------------------------------------------------------------------

TemplateValue = Union[int, bool, mx.Dtype]

_METAL_TYPE = {
    mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t",
    mx.uint32: "uint32_t", mx.int32: "int32_t", mx.uint8: "uint8_t", mx.int64: "int64_t",
}
_CUDA_TYPE = {
    mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16",
    mx.uint32: "uint32_t", mx.int32: "int32_t", mx.uint8: "uint8_t", mx.int64: "int64_t",
}

# The built-ins MLX's metal_kernel declares when their name occurs in the body (in this order).
METAL_ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)


@dataclass(frozen=True)
class InputInfo:
    """What the signature writers need to know about one input array."""

    dtype: mx.Dtype
    size: int
    ndim: int = 1


def _template_value(v: TemplateValue, types: Mapping) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    return types[v]


def metal_translation_unit(
    spec: KernelSpec,
    inputs: Sequence[InputInfo],
    output_dtypes: Sequence[mx.Dtype],
    template: Sequence[Tuple[str, TemplateValue]],
    prologue: str = '#include "metal_shim.h"\n',
    attributes_on_instantiation: bool = False,
) -> str:
    """The Metal library source ``mx.fast.metal_kernel`` builds (MLX 0.32 write_signature).

    MLX prepends its own ``utils.h``; ``prologue`` stands in for it. Inputs with fewer than
    8 elements go to the ``constant`` address space, others to ``device``; scalars are
    references. The explicit instantiation carries ``[[host_name]] [[kernel]]``, which a
    C++ compiler cannot parse in that place, so it is dropped unless asked for.
    """
    header, body = render(spec, "metal")
    name = "custom_kernel_" + spec.kernel_name("metal")
    tparams = []
    for pname, v in template:
        kind = "bool" if isinstance(v, bool) else "int" if isinstance(v, int) else "typename"
        tparams.append(f"{kind} {pname}")
    lines = [prologue, header]
    if tparams:
        lines.append("template <" + ", ".join(tparams) + ">\n")
    params: List[str] = []
    index = 0
    for pname, info in zip(spec.inputs, inputs):
        space = "constant" if info.size < 8 else "device"
        ref = "&" if info.ndim == 0 else "*"
        params.append(f"  const {space} {_METAL_TYPE[info.dtype]}{ref} {pname} [[buffer({index})]]")
        index += 1
        for suffix, ctype in (("_shape", "int*"), ("_strides", "int64_t*"), ("_ndim", "int&")):
            if info.ndim > 0 and (pname + suffix) in body:
                params.append(f"  const constant {ctype} {pname}{suffix} [[buffer({index})]]")
                index += 1
    for pname, dt in zip(spec.outputs, output_dtypes):
        ctype = f"atomic<{_METAL_TYPE[dt]}>" if spec.atomic_outputs else _METAL_TYPE[dt]
        params.append(f"  device {ctype}* {pname} [[buffer({index})]]")
        index += 1
    for attr, ctype in METAL_ATTRIBUTES:
        if attr in body:
            params.append(f"  {ctype} {attr} [[{attr}]]")
    lines.append(f"[[kernel]] void {name}(\n" + ",\n".join(params) + ") {\n")
    lines.append(body + "\n}\n")
    if tparams:
        targs = "<" + ", ".join(_template_value(v, _METAL_TYPE) for _, v in template) + ">"
        attrs = f'[[host_name("{name}")]] [[kernel]] ' if attributes_on_instantiation else ""
        lines.append(f"\ntemplate {attrs}decltype({name}{targs}) {name}{targs};\n")
    return "".join(lines)


CUDA_DEFAULT_HEADER = r"""
#include "mlx/backend/cuda/device/utils.cuh"

#include <cooperative_groups.h>

#define inf cuda::std::numeric_limits<float>::infinity()

"""


def cuda_translation_unit(
    spec: KernelSpec,
    inputs: Sequence[InputInfo],
    output_dtypes: Sequence[mx.Dtype],
    template: Sequence[Tuple[str, TemplateValue]],
) -> str:
    """The CUDA source ``mx.fast.cuda_kernel`` hands to NVRTC (MLX 0.32 build_kernel)."""
    header, body = render(spec, "cuda")
    name = "custom_kernel_" + spec.kernel_name("cuda")
    out = [CUDA_DEFAULT_HEADER, header, "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"]
    params = [f"    const {_CUDA_TYPE[i.dtype]}* {n}" for n, i in zip(spec.inputs, inputs)]
    params += [f"    {_CUDA_TYPE[d]}* {n}" for n, d in zip(spec.outputs, output_dtypes)]
    out.append(f"__global__ void {name}(\n" + ",\n".join(params) + ") {\n")
    out += [line + "\n" for line in template_constants(template, _CUDA_TYPE)]
    out.append("\n" + body + "\n}\n\n} // namespace mlx::core::cu\n")
    return "".join(out)


def template_constants(template: Sequence[Tuple[str, TemplateValue]], type_names: Dict[Any, str]) -> List[str]:
    """Template values as the constants a function body sees (how MLX instantiates them)."""
    lines = []
    for name, v in template:
        if isinstance(v, bool):
            lines.append(f"  constexpr bool {name} = {'true' if v else 'false'};")
        elif isinstance(v, int):
            lines.append(f"  constexpr int {name} = {v};")
        else:
            lines.append(f"  using {name} = {type_names[v]};")
    return lines


def template_args(spec: KernelSpec, values: Dict[str, TemplateValue]) -> List[Tuple[str, TemplateValue]]:
    """The (name, value) list in the spec's order; every name must be given."""
    missing = [t for t in spec.template if t not in values]
    if missing:
        raise KeyError(f"{spec.name}: missing template values {missing}")
    # MLX's CUDA backend puts the values in the kernel's C++ name: a minus sign breaks it
    negative = [t for t in spec.template if isinstance(values[t], int) and values[t] < 0]
    if negative:
        raise ValueError(f"{spec.name}: template values must not be negative: {negative}")
    return [(t, values[t]) for t in spec.template]
