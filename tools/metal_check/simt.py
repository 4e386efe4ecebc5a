"""Run the generated kernels on the CPU: a small SIMT simulator for the shared kernel text.

A third target for the same algorithm text (``flash_moe.kernels.sources``): the ``FM_*``
macros map to C++20 on the host. One threadgroup runs at a time on ``group_size`` host
threads; threadgroup memory is a function-local ``static`` (shared by those threads),
``FM_BARRIER`` is a ``std::barrier`` over the threadgroup, and ``FM_SHFL_XOR`` exchanges
through a per-warp buffer between two barriers of the warp's 32 threads. This proves
indexing, layouts, reductions and dequantization of the very text the GPUs compile,
without a GPU; it says nothing about speed.

``simulate(plan)`` runs a ``flash_moe.kernels.launch.Plan`` whose inputs are MLX arrays
and returns its outputs as MLX arrays (poisoned with NaN before the run).
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from flash_moe.kernels import codegen, sources
from flash_moe.kernels.launch import Plan

PRELUDE = r"""
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

struct uint2 { uint32_t x, y; };
struct int4 { int32_t x, y, z, w; };
struct uint4 { uint32_t x, y, z, w; };
struct float4 { float x, y, z, w; };

namespace fmsim {
struct bf16 {  // bfloat16 with round-to-nearest-even from float
  uint16_t bits;
  bf16() = default;
  bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    bits = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
struct f16 {  // IEEE half with round-to-nearest-even from float (no compiler support needed)
  uint16_t bits;
  f16() = default;
  f16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 16) & 0x8000u, fexp = (u >> 23) & 0xFFu, mant = u & 0x7FFFFFu;
    const int e = int(fexp) - 127 + 15;
    uint32_t h;
    if (fexp == 0xFFu) {
      h = 0x7C00u | (mant ? 0x200u : 0u);
    } else if (e >= 31) {
      h = 0x7C00u;
    } else if (e <= 0) {
      if (e < -10) {
        h = 0;
      } else {
        const uint32_t m = mant | 0x800000u;
        const int shift = 14 - e;
        h = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (h & 1u))) h++;
      }
    } else {
      h = (uint32_t(e) << 10) | (mant >> 13);
      const uint32_t rem = mant & 0x1FFFu;
      if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
    }
    bits = uint16_t(sign | h);
  }
  operator float() const {
    const uint32_t sign = uint32_t(bits & 0x8000u) << 16, e = (bits >> 10) & 0x1Fu, m = bits & 0x3FFu;
    uint32_t u;
    if (e == 0) {
      const float v = std::ldexp(float(m), -24);
      return sign ? -v : v;
    } else if (e == 31) {
      u = sign | 0x7F800000u | (m << 13);
    } else {
      u = sign | ((e - 15 + 127) << 23) | (m << 13);
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
inline float as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
struct h2 {  // two halves, as FM_H2
  f16 lo, hi;
};
inline h2 h2_bits(uint32_t u) {
  h2 v;
  v.lo.bits = uint16_t(u & 0xFFFFu);
  v.hi.bits = uint16_t(u >> 16);
  return v;
}
inline f16 fma16(f16 a, f16 b, f16 c) {  // exact in double, rounded to half through float (a GPU
  // rounds once: a rare tie may come out one half-ulp apart)
  const double r = double(float(a)) * double(float(b)) + double(float(c));
  return f16(float(r));
}
inline h2 h2_fma(h2 a, h2 b, h2 c) {
  h2 r;
  r.lo = fma16(a.lo, b.lo, c.lo);
  r.hi = fma16(a.hi, b.hi, c.hi);
  return r;
}
inline uint32_t h2_pack(float lo, float hi) {
  return uint32_t(f16(lo).bits) | (uint32_t(f16(hi).bits) << 16);
}
inline float h2_sum(h2 v) {
  return float(v.lo) + float(v.hi);
}
thread_local int tg = 0, tid = 0;
thread_local std::barrier<>* tg_barrier = nullptr;
thread_local std::barrier<>* warp_barrier = nullptr;
thread_local float* shfl_buf = nullptr;
// Asynchronous copies land only when a wait retires their group (as late as the GPU may
// deliver them), so reading a stage before waiting for it reads stale data and fails a test.
struct PendingCopy {
  void* dst;
  unsigned char data[16];
  size_t size;
};
thread_local std::vector<PendingCopy> cp_open;
thread_local std::deque<std::vector<PendingCopy>> cp_groups;
template <typename T>
inline void cp_async(T* dst, const T* src) {
  static_assert(sizeof(T) <= 16, "copies are at most 16 bytes");
  PendingCopy c{dst, {}, sizeof(T)};
  std::memcpy(c.data, src, sizeof(T));
  cp_open.push_back(c);
}
inline void cp_commit() {
  cp_groups.push_back(std::move(cp_open));
  cp_open.clear();
}
inline void cp_wait(int n) {
  while (int(cp_groups.size()) > n) {
    for (const auto& c : cp_groups.front()) std::memcpy(c.dst, c.data, c.size);
    cp_groups.pop_front();
  }
}
// L2 hints, recorded (the test checks that each lies inside an input and what it covers).
struct Hint {
  const void* p;
  unsigned long long bytes;
};
inline std::mutex hint_mutex;
inline std::vector<Hint> hints;
inline void prefetch_l2(const void* p, unsigned long long bytes) {
  std::lock_guard<std::mutex> lock(hint_mutex);
  hints.push_back(Hint{p, bytes});
}
inline uint32_t as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
// The matrix-unit product (FM_MMA): every lane leaves its fragments in the warp's buffer, and
// after a barrier each computes its own C values from the whole A and B, in float, k in order.
// Which lane holds what is the FM_MMA_* layout the translation unit defines (CUDA's or Metal's).
struct MmaLane {
  uint32_t a[4], b[2];
};
thread_local MmaLane* mma_buf = nullptr;
inline float bf16_half(uint32_t reg, int hi) {
  return as_float(hi ? (reg & 0xFFFF0000u) : (reg << 16));
}
inline float shfl_xor(float v, int m) {
  const int lane = tid & 31;
  shfl_buf[lane] = v;
  warp_barrier->arrive_and_wait();
  const float r = shfl_buf[lane ^ m];
  warp_barrier->arrive_and_wait();
  return r;
}
}  // namespace fmsim

#define FM_INLINE inline
#define FM_DEVICE
#define FM_THREAD
#define FM_SHARED static
#define FM_BARRIER() fmsim::tg_barrier->arrive_and_wait()
#define FM_SHFL_XOR(v, m) fmsim::shfl_xor((v), (m))
#define FM_AS_FLOAT(u) fmsim::as_float(u)
#define FM_EXP(v) std::exp(v)
#define FM_ATOMIC_ADD(p, v) std::atomic_ref<float>(*(p)).fetch_add(v)
#define FM_TG
#define FM_RING(T, name, count) static T name[count]
#define FM_WARP_SYNC() fmsim::warp_barrier->arrive_and_wait()
#define FM_CP_ASYNC16(dst, src) fmsim::cp_async((dst), (src))
#define FM_CP_ASYNC4(dst, src) fmsim::cp_async((dst), (src))
#define FM_CP_COMMIT() fmsim::cp_commit()
#define FM_CP_WAIT(n) fmsim::cp_wait(n)
#define FM_AND_OR(a, b, c) (((a) & (b)) | (c))
#define FM_PREFETCH_L2(p, bytes) fmsim::prefetch_l2((const void*)(p), (unsigned long long)(bytes))
#define FM_AS_UINT(f) fmsim::as_uint(f)
#define FM_MMA(c, a, b) fmsim::mma((c), (a), (b))
#define FM_H2 fmsim::h2
#define FM_H2_BITS(u) fmsim::h2_bits(u)
#define FM_H2_FMA(a, b, c) fmsim::h2_fma((a), (b), (c))
#define fm_h2_pack fmsim::h2_pack
#define fm_h2_sum fmsim::h2_sum
"""

# FM_MMA, built after the lane layout the translation unit picks (codegen.MMA_LAYOUTS).
MMA_EMULATION = r"""
namespace fmsim {
inline void mma(float* c, const uint32_t* a, const uint32_t* b) {
  const int lane = tid & 31;
  for (int i = 0; i < 4; ++i) mma_buf[lane].a[i] = a[i];
  for (int i = 0; i < 2; ++i) mma_buf[lane].b[i] = b[i];
  warp_barrier->arrive_and_wait();
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int fr = FM_MMA_FR(l), fc = FM_MMA_FC(l);
    for (int i = 0; i < 4; ++i) {  // a[i]: rows fr (+ 8 for odd i), columns fc (+ 8 for i >= 2)
      for (int hi = 0; hi < 2; ++hi) {
        A[fr + 8 * (i & 1)][fc + 8 * (i >> 1) + hi] = bf16_half(mma_buf[l].a[i], hi);
      }
    }
    for (int v = 0; v < 4; ++v) {
      B[FM_MMA_BK(l, v)][FM_MMA_BN(l, v)] = bf16_half(mma_buf[l].b[v >> 1], v & 1);
    }
  }
  const int fr = FM_MMA_FR(lane), fc = FM_MMA_FC(lane);
  for (int i = 0; i < 4; ++i) {  // c[i]: row fr (+ 8 for i >= 2), column fc (+ 1 for odd i)
    const int m = fr + 8 * (i >> 1), nn = fc + (i & 1);
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc += A[m][k] * B[k][nn];
    c[i] = acc;
  }
  warp_barrier->arrive_and_wait();
}
}  // namespace fmsim
"""

BODY_PRELUDE = r"""
  const int fm_tg = fmsim::tg;
  const int fm_tid = fmsim::tid;
  const int fm_lane = fm_tid & 31;
  const int fm_warp = fm_tid >> 5;
"""

LAUNCHER = r"""
extern "C" int fm_hints(unsigned long long* out, int max) {  // (address, bytes) pairs; the count
  const int n = int(fmsim::hints.size());
  for (int i = 0; i < n && i < max; ++i) {
    out[2 * i] = (unsigned long long)fmsim::hints[i].p;
    out[2 * i + 1] = fmsim::hints[i].bytes;
  }
  return n;
}

extern "C" int fm_launch(void** args, int n_groups, int group_size) {
  fmsim::hints.clear();
  std::barrier<> tg_barrier(group_size);
  std::vector<std::barrier<>*> warp_barriers;
  std::vector<float> shfl(group_size);
  std::vector<fmsim::MmaLane> mma(group_size);
  for (int w = 0; w < group_size / 32; ++w) warp_barriers.push_back(new std::barrier<>(32));
  std::vector<std::thread> threads;
  for (int t = 0; t < group_size; ++t) {
    threads.emplace_back([&, t] {
      fmsim::tid = t;
      fmsim::tg_barrier = &tg_barrier;
      fmsim::warp_barrier = warp_barriers[t / 32];
      fmsim::shfl_buf = shfl.data() + (t / 32) * 32;
      fmsim::mma_buf = mma.data() + (t / 32) * 32;
      for (int g = 0; g < n_groups; ++g) {
        fmsim::tg = g;
        fm_kernel(ARGS);
        fmsim::cp_open.clear();  // what a threadgroup left in flight does not outlive it
        fmsim::cp_groups.clear();
        tg_barrier.arrive_and_wait();  // threadgroup memory is reused by the next group
      }
    });
  }
  for (auto& th : threads) th.join();
  for (auto* b : warp_barriers) delete b;
  return 0;
}
"""

_CTYPE = {mx.float32: "float", mx.bfloat16: "fmsim::bf16", mx.float16: "fmsim::f16",
          mx.uint32: "uint32_t", mx.int32: "int32_t"}
_NP_STORAGE = {mx.float32: np.float32, mx.bfloat16: np.uint16, mx.float16: np.float16,
               mx.uint32: np.uint32, mx.int32: np.int32}
_POISON_BITS = {mx.float32: np.float32(np.nan), mx.bfloat16: np.uint16(0x7FC0),
                mx.float16: np.float16(np.nan), mx.uint32: np.uint32(0x7FC00000)}  # (a float NaN's bits)


def translation_unit(plan: Plan, layout: str = "cuda") -> str:
    spec = plan.spec
    defs = "".join(f"#define {k} {v}\n" for k, v in spec.defines)
    params = [f"const {_CTYPE[a.dtype]}* {n}" for n, a in zip(spec.inputs, plan.inputs)]
    params += [f"{_CTYPE[d]}* {n}" for n, d in zip(spec.outputs, plan.out_dtypes)]
    consts = codegen.template_constants(codegen.template_args(spec, plan.template), _CTYPE)
    n_in = len(spec.inputs)
    args = [f"({_CTYPE[a.dtype]} const*)args[{i}]" for i, a in enumerate(plan.inputs)]
    args += [f"({_CTYPE[d]}*)args[{n_in + i}]" for i, d in enumerate(plan.out_dtypes)]
    return (PRELUDE + codegen.MMA_LAYOUTS[layout] + MMA_EMULATION + defs + sources.HELPERS
            + "static void fm_kernel(" + ", ".join(params) + ") {\n" + "\n".join(consts) + "\n"
            + BODY_PRELUDE + spec.body + "\n}\n"
            + LAUNCHER.replace("ARGS", ", ".join(args)))


_BUILD_DIR = Path(tempfile.gettempdir()) / "flash_moe_simt"
_LIBS: Dict[str, ctypes.CDLL] = {}


def find_compiler() -> Optional[str]:
    return shutil.which("clang++") or shutil.which("g++")


def _library(src: str) -> ctypes.CDLL:
    key = hashlib.sha1(src.encode()).hexdigest()[:16]
    if key in _LIBS:
        return _LIBS[key]
    _BUILD_DIR.mkdir(exist_ok=True)
    so = _BUILD_DIR / f"k_{key}.so"
    if not so.exists():
        cpp = _BUILD_DIR / f"k_{key}.cpp"
        cpp.write_text(src)
        cxx = find_compiler()
        if cxx is None:
            raise FileNotFoundError("no C++ compiler (clang++ or g++) on PATH")
        tmp = so.with_suffix(".tmp.so")
        proc = subprocess.run([cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread",
                               "-Wl,--no-undefined", "-o", str(tmp), str(cpp)], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"simulator build failed:\n{proc.stderr[-4000:]}")
        tmp.rename(so)
    lib = ctypes.CDLL(str(so))
    lib.fm_launch.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
    lib.fm_hints.argtypes = [ctypes.c_void_p, ctypes.c_int]
    _LIBS[key] = lib
    return lib


def _to_numpy(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a))


def simulate(plan: Plan, hints: Optional[List[Tuple[str, int, int]]] = None, layout: str = "cuda") -> List[mx.array]:
    """Run ``plan`` on the CPU simulator; inputs must be MLX arrays. ``layout``: whose matrix-unit
    lane layout (``FM_MMA_*``) the kernel text is built with, "cuda" or "metal".

    Every L2 hint (``FM_PREFETCH_L2``) the kernel gave must lie inside one input, else
    ``AssertionError``; ``hints``, when given, receives them as (input name, first byte, end).
    """
    lib = _library(translation_unit(plan, layout))
    ins = [_to_numpy(a) for a in plan.inputs]
    outs = []
    for shape, dt in zip(plan.out_shapes, plan.out_dtypes):
        fill = _POISON_BITS[dt] if plan.init_value is None else plan.init_value
        outs.append(np.full(shape, fill, dtype=_NP_STORAGE[dt]))
    ptrs = (ctypes.c_void_p * (len(ins) + len(outs)))(*[a.ctypes.data for a in ins + outs])
    lib.fm_launch(ptrs, plan.n_groups, plan.group_size)
    found = _hints(lib, plan.spec.inputs, ins)
    if hints is not None:
        hints.extend(found)
    result = []
    for arr, dt in zip(outs, plan.out_dtypes):
        m = mx.array(arr)
        result.append(m.view(mx.bfloat16) if dt == mx.bfloat16 else m)
    return result


def _hints(lib: ctypes.CDLL, names, arrays: List[np.ndarray]) -> List[Tuple[str, int, int]]:
    """The last launch's L2 hints as (input name, first byte, end byte) inside that input."""
    n = lib.fm_hints(None, 0)
    raw = (ctypes.c_ulonglong * (2 * n))()
    lib.fm_hints(raw, n)
    found = []
    for i in range(n):
        p, size = raw[2 * i], raw[2 * i + 1]
        for name, a in zip(names, arrays):
            start = p - a.ctypes.data
            if 0 <= start and start + size <= a.nbytes:
                found.append((name, start, start + size))
                break
        else:
            raise AssertionError(f"L2 hint of {size} bytes at {p:#x} lies outside every input of the kernel")
    return found


def kernel(target: str, spec: codegen.KernelSpec, shared_memory: int = 0):
    """A stand-in for ``launch._kernel``: a callable with the signature of MLX's custom kernels
    that runs ``spec`` on the simulator (a NaN ``init_value``, the tests' poison, stays poison).
    ``shared_memory`` is not needed: the simulator sizes the ring statically."""
    def call(inputs, template, grid, threadgroup, output_shapes, output_dtypes, init_value=None):
        fill = None if init_value is None or np.isnan(init_value) else init_value
        return simulate(Plan(spec, list(inputs), dict(template), grid[0] // threadgroup[0], threadgroup[0],
                             list(output_shapes), list(output_dtypes), fill))
    return call
