"""Compile-check every generated kernel off the GPU.

Metal: each kernel variant is wrapped the way ``mx.fast.metal_kernel`` wraps it (MLX 0.32's
signature writer, emulated in ``flash_moe.kernels.codegen.metal_translation_unit``) and
compiled by clang in C++17 mode (``-fsyntax-only``) against ``metal_shim.h``, which declares
the Metal types, address spaces and built-ins the kernels use.

CUDA: the same variants wrapped the way ``mx.fast.cuda_kernel`` wraps them, compiled by
nvcc for sm_90 against a stub of MLX's device header (``cuda_stub/``); ``--ptxas`` prints
registers, spills and shared memory per kernel; ``--sass`` the static count of machine
instructions per kernel (its ``.text`` section over 16 bytes an sm_90 instruction), a local
proxy for the instructions a launch issues: the kernels' loops run once per item (v2's down
once per two row sets), so a change of the per-item body shows up one to one. ``--loops``
disassembles the same cubins (``cuobjdump`` and ``nvdisasm`` on PATH: the CUDA toolkit's, or
``pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm``) and prints every loop's body (code
up to a backward branch) with its instruction mix: the cost of one item, row by row.

The variants are the launch plans the library makes (``flash_moe.kernels.launch.plan_*``)
for the real Qwen3.5-397B shapes and the tiny test model's, over bits, dtypes, token and
expert counts, and small inputs that Metal passes in the ``constant`` address space.

Usage: python tools/metal_check/check.py [--metal] [--cuda] [--ptxas] [--sass [FILTER]] [--loops FILTER] [--dump DIR]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import struct
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import mlx.core as mx  # noqa: E402

from flash_moe.kernels import codegen, launch  # noqa: E402
from flash_moe.kernels.launch import ArraySpec as A  # noqa: E402
from flash_moe.kernels.reference import ExpertWeights, Projection  # noqa: E402


def _experts(U: int, D: int, I: int, bits: int, gs: int, sdt) -> ExpertWeights:
    def proj(rows, dim):
        return Projection(A((U, rows, dim * bits // 32), mx.uint32), A((U, rows, dim // gs), sdt),
                          A((U, rows, dim // gs), sdt))
    return ExpertWeights(proj(I, D), proj(I, D), proj(D, I), bits, gs)


def variants(target: str) -> List[Tuple[str, launch.Plan]]:
    """(label, plan) for every kernel variant worth compiling, deduplicated."""
    out: List[Tuple[str, launch.Plan]] = []
    f32, bf16, f16 = mx.float32, mx.bfloat16, mx.float16
    moe_cases = [  # (D, I, U, bits, gs, N, K, x dtype, scale dtype)
        (4096, 1024, 512, 4, 64, 1, 4, bf16, bf16),
        (4096, 1024, 10, 4, 64, 1, 10, f32, bf16),
        (4096, 1024, 40, 4, 64, 4, 10, f16, f16),
        (4096, 1024, 4, 2, 64, 1, 4, bf16, bf16),
        (4096, 1024, 80, 2, 64, 8, 10, f32, f32),
        (4096, 1024, 10, 8, 64, 1, 10, bf16, bf16),
        (4096, 1024, 10, 4, 128, 2, 10, bf16, bf16),
        (4096, 1024, 10, 4, 32, 1, 10, bf16, bf16),
        (64, 64, 8, 4, 64, 1, 2, f32, f32),      # the tiny test model
        (64, 64, 8, 2, 64, 3, 2, f32, bf16),
        (128, 64, 8, 8, 32, 2, 2, f16, f16),
    ]
    for D, I, U, bits, gs, N, K, xdt, sdt in moe_cases:
        w = _experts(U, D, I, bits, gs, sdt)
        x, inds, scores = A((N, D), xdt), A((N, K), mx.int32), A((N, K), xdt)
        tag = f"D{D}_I{I}_b{bits}_g{gs}_N{N}_K{K}_{xdt}_{sdt}".replace("mlx.core.", "")
        for version in (1, 2, 4, 5, 6):  # (v5 falls back to v4 where its ring does not fit: Metal; v6 to v2)
            v = f"v{version}_"
            plans = launch.plan_expert_mlp(target, x, w, inds, scores, version=version)
            assert plans is not None, f"no plan for {v}{tag}"
            out += [(v + p.spec.name + "_" + tag, p) for p in plans]
            if version in (1, 2):  # the float32 sum the MoE layer asks for, written by down itself
                plans = launch.plan_expert_mlp(target, x, w, inds, scores, version=version, out_dtype=f32)
                out.append((v + plans[-1].spec.name + "_f32out_" + tag, plans[-1]))
            comb = (A((N, D), bf16), A((N, 1), bf16), A((N, D), bf16))
            plans = launch.plan_expert_mlp(target, x, w, inds, scores, combine=comb, version=version)
            assert plans is not None, f"no fused plan for {v}{tag}"
            out.append((v + plans[-1].spec.name + "_" + tag, plans[-1]))
    # v5 with a ring small enough for Metal's 32 KiB, so that its Metal text is compiled too
    saved = dict(launch.TUNING["expert_mlp_ska"])
    launch.TUNING["expert_mlp_ska"].update(W=2, RD=1, P=2)
    try:
        for D, I, bits, sdt in ((1024, 256, 4, bf16), (2048, 128, 2, f32)):
            w = _experts(4, D, I, bits, 64, sdt)
            (plan,) = launch.plan_expert_mlp(target, A((1, D), bf16), w, A((1, 2), mx.int32), A((1, 2), bf16),
                                             version=5)
            assert plan.spec.name == "expert_mlp_ska", f"v5 does not fit {target} at D{D}"
            out.append((f"v5_small_ring_D{D}_I{I}_b{bits}_{sdt}".replace("mlx.core.", ""), plan))
    finally:
        launch.TUNING["expert_mlp_ska"] = saved
    # v6 with x staged once per token (a launch of its own), with its L2 hints on, and hinting
    # down's rows (CUDA only)
    saved = dict(launch.TUNING["gate_up_mma"])
    try:
        for xb, pf, dh in ((1, 0, 0), (0, 1, 0), (0, 16, 0), (1, 1, 9), (0, 0, 5)):
            launch.TUNING["gate_up_mma"] = dict(saved, XB=xb, PF=pf, DH=dh)
            for D, I, bits, xdt, N in ((4096, 1024, 4, bf16, 1), (4096, 1024, 2, f16, 2), (1024, 256, 4, f32, 1)):
                w = _experts(10, D, I, bits, 64, bf16)
                plans = launch.plan_expert_mlp(target, A((N, D), xdt), w, A((N, 10), mx.int32),
                                               A((N, 10), bf16), version=6)
                out += [(f"v6_xb{xb}_pf{pf}_dh{dh}_{p.spec.name}_D{D}_I{I}_b{bits}_N{N}_{xdt}".replace("mlx.core.", ""), p)
                        for p in plans if p.spec.name != "down_pf"]
        # down on the matrix units (MD), alone and with the combine fused; shapes whose staged h
        # fits Metal's 32 KiB too
        launch.TUNING["gate_up_mma"] = dict(saved, MD=1)
        for D, I, bits, xdt, N, K in ((4096, 1024, 4, bf16, 1, 10), (4096, 1024, 2, f16, 2, 10),
                                      (1024, 256, 4, f32, 1, 4), (512, 256, 4, bf16, 2, 4), (512, 512, 2, bf16, 1, 4)):
            w = _experts(10, D, I, bits, 64, bf16)
            x, inds, scores = A((N, D), xdt), A((N, K), mx.int32), A((N, K), bf16)
            tag = f"D{D}_I{I}_b{bits}_N{N}_K{K}_{xdt}".replace("mlx.core.", "")
            for comb in (None, (A((N, D), bf16), A((N, 1), bf16), A((N, D), bf16))):
                plans = launch.plan_expert_mlp(target, x, w, inds, scores, combine=comb, version=6)
                out += [(f"v6_md_{p.spec.name}_{tag}", p) for p in plans[-2:]
                        if p.spec.name in ("stage_h_mma", "down_mma", "down_combine_mma")]
    finally:
        launch.TUNING["gate_up_mma"] = saved
    # v2 with its L2 hints on (whole run / a distance ahead for gate/up, rows for down; gate/up
    # hinting down's rows, CUDA only), with and without gate/up's double buffer
    saved = tuple(dict(launch.TUNING[k]) for k in ("gate_up_pf", "down_pf", "gate_up_hp", "down_hp"))
    try:
        for pf, db, dh in ((16, 1, 0), (2, 1, 0), (16, 0, 0), (4, 0, 0), (0, 1, 9), (2, 0, 1)):
            launch.TUNING["gate_up_pf"] = dict(saved[0], PF=pf, DB=db, DH=dh)
            launch.TUNING["down_pf"] = dict(saved[1], PF=1)
            launch.TUNING["gate_up_hp"], launch.TUNING["down_hp"] = dict(saved[2], HP=0), dict(saved[3], HP=0)
            for D, I, bits, sdt, N in ((4096, 1024, 4, bf16, 1), (4096, 1024, 2, f32, 2), (64, 64, 4, f32, 1)):
                w = _experts(10, D, I, bits, 64, sdt)
                plans = launch.plan_expert_mlp(target, A((N, D), bf16), w, A((N, 10), mx.int32),
                                               A((N, 10), bf16), version=2)
                out += [(f"v2_l2hints{pf}_db{db}_dh{dh}_{p.spec.name}_D{D}_I{I}_b{bits}_N{N}_{sdt}".replace("mlx.core.", ""), p)
                        for p in plans]
        # half-precision products (HP 1 and 2), gate/up and down (the fused combine too)
        for hp in (1, 2):
            launch.TUNING["gate_up_hp"] = dict(saved[2], HP=hp)
            launch.TUNING["down_hp"] = dict(saved[3], HP=hp)
            for D, I, bits, xdt, N, K in ((4096, 1024, 4, bf16, 1, 10), (4096, 1024, 2, f16, 2, 10),
                                          (4096, 1024, 8, bf16, 1, 4), (64, 64, 4, bf16, 1, 2)):
                w = _experts(10, D, I, bits, 64, bf16)
                x, inds, scores = A((N, D), xdt), A((N, K), mx.int32), A((N, K), bf16)
                tag = f"D{D}_I{I}_b{bits}_N{N}_K{K}_{xdt}".replace("mlx.core.", "")
                for comb in (None, (A((N, D), bf16), A((N, 1), bf16), A((N, D), bf16))):
                    # (planned for CUDA: only CUDA runs them, but Metal's text is checked too)
                    plans = launch.plan_expert_mlp("cuda", x, w, inds, scores, combine=comb, version=2)
                    assert all(p.template["HP"] == hp for p in plans), f"HP {hp} not planned for {tag}"
                    out += [(f"v2_hp{hp}_{p.spec.name}_{tag}", p) for p in (plans if comb is None else plans[-1:])]
    finally:
        for k, v in zip(("gate_up_pf", "down_pf", "gate_up_hp", "down_hp"), saved):
            launch.TUNING[k] = v
    for shape, dts in (((1, 4096), (bf16,) * 4), ((3, 64), (f32, f32, bf16, f32)), ((2, 5, 4096), (f16,) * 4)):
        gate = A(shape[:-1] + (1,), dts[2])
        plan = launch.plan_moe_combine(target, A(shape, dts[0]), A(shape, dts[1]), gate, A(shape, dts[3]))
        assert plan is not None
        out.append((f"combine_{'x'.join(map(str, shape))}", plan))
    for B, HK, HV, DK, DV, dt in ((1, 16, 64, 128, 128, bf16), (2, 16, 32, 128, 128, f32),
                                  (1, 2, 4, 16, 16, f32), (1, 4, 4, 256, 64, f16)):
        plan = launch.plan_gated_delta_step(
            target, A((B, HK, DK), dt), A((B, HK, DK), dt), A((B, HV, DV), dt), A((B, HV), dt),
            A((B, HV), dt), A((B, HV, DV, DK), mx.float32))
        assert plan is not None
        out.append((f"gated_delta_B{B}_HK{HK}_HV{HV}_DK{DK}_DV{DV}", plan))
    return out


def _infos(plan: launch.Plan) -> List[codegen.InputInfo]:
    return [codegen.InputInfo(a.dtype, a.size, a.ndim) for a in plan.inputs]


def plan_source(target: str, plan: launch.Plan) -> str:
    """The complete source of ``plan``'s kernel, as MLX would compile it for ``target``."""
    unit = codegen.metal_translation_unit if target == "metal" else codegen.cuda_translation_unit
    return unit(plan.spec, _infos(plan), plan.out_dtypes, codegen.template_args(plan.spec, plan.template))


def translation_units(target: str) -> Dict[str, str]:
    """label -> complete source, as MLX would compile it, for every variant."""
    units: Dict[str, str] = {}
    seen = set()
    for label, plan in variants(target):
        src = plan_source(target, plan)
        if src not in seen:
            seen.add(src)
            units[label] = src
    return units


def _compile(cmd: List[str], src: str, suffix: str) -> Tuple[int, str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("unit" + suffix)
        path.write_text(src)
        proc = subprocess.run(cmd + [str(path)], capture_output=True, text=True, cwd=tmp)
        return proc.returncode, proc.stdout + proc.stderr


def ptxas_registers(plan: launch.Plan, nvcc: Optional[str] = None) -> int:
    """Registers a thread of ``plan``'s CUDA kernel takes, by sm_90 ptxas."""
    rc, log = _compile(_nvcc_cubin(nvcc, "/dev/null") + ["-Xptxas", "-v"], plan_source("cuda", plan), ".cu")
    if rc:
        raise RuntimeError(log[-2000:])
    (regs,) = map(int, re.findall(r"Used (\d+) registers", log))
    return regs


def sass_instructions(cubin: bytes) -> Dict[str, int]:
    """Kernel (mangled name) -> static machine instructions, from an sm_90 cubin's ELF sections."""
    shoff = struct.unpack_from("<Q", cubin, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    names = sections[shstrndx][4]  # file offset of the section-name table
    out = {}
    for sec in sections:
        name = cubin[names + sec[0]:cubin.index(b"\0", names + sec[0])].decode()
        if name.startswith(".text."):
            out[name[len(".text."):]] = sec[5] // 16  # sh_size; 16 bytes an instruction
    return out


def _nvcc_cubin(nvcc: Optional[str], out: str) -> List[str]:
    """The nvcc command that builds a unit into an sm_90 cubin ``out`` (the unit's path follows)."""
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc is not on PATH")
    return [nvcc, "-std=c++17", "-arch=sm_90", "-cubin", "-o", out, "-I", str(HERE / "cuda_stub")]


def _in_cubin(src: str, read, nvcc: Optional[str] = None):
    """``read(directory)`` on a directory holding ``unit.cubin``, the sm_90 build of ``src``."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "unit.cu").write_text(src)
        proc = subprocess.run(_nvcc_cubin(nvcc, "unit.cubin") + ["unit.cu"], capture_output=True, text=True, cwd=tmp)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-2000:])
        return read(Path(tmp))


def count_sass(label_filter: str = "", nvcc: Optional[str] = None) -> Dict[str, int]:
    """label -> static machine instructions of every CUDA variant whose label contains the filter."""
    units = {k: v for k, v in translation_units("cuda").items() if label_filter in k}

    def one(src: str) -> int:
        return _in_cubin(src, lambda d: sum(sass_instructions((d / "unit.cubin").read_bytes()).values()), nvcc)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return dict(zip(units, pool.map(one, units.values())))


def loop_bodies(sass: str) -> List[Tuple[int, int, collections.Counter]]:
    """(start, end, opcode counts) of every loop in ``cuobjdump -sass`` text: the code from a
    backward branch's target to the branch."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in
           re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;", sass)]
    loops = []
    for at, text in ins:
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < at:
            start = int(m.group(1), 16)
            ops = [re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for a, t in ins if start <= a <= at]
            loops.append((start, at, collections.Counter(ops)))
    return loops


def print_loops(label_filter: str, nvcc: Optional[str] = None) -> None:
    """Each loop of every CUDA variant whose label contains the filter: size and top opcodes."""
    if not (shutil.which("cuobjdump") and shutil.which("nvdisasm")):
        raise FileNotFoundError("--loops needs cuobjdump and nvdisasm on PATH "
                                "(pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    for label, src in translation_units("cuda").items():
        if label_filter not in label:
            continue
        sass = _in_cubin(src, lambda d: subprocess.run(["cuobjdump", "-sass", "unit.cubin"], capture_output=True,
                                                       text=True, cwd=d, check=True).stdout, nvcc)
        print(label)
        for start, end, ops in loop_bodies(sass):
            top = ", ".join(f"{op} {n}" for op, n in ops.most_common(8))
            print(f"  loop {start:#06x}-{end:#06x}: {sum(ops.values()):5d} instructions ({top})")


def find_clang() -> Optional[str]:
    for name in ("clang++", "clang"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def check_metal(clang: Optional[str] = None) -> Dict[str, Tuple[int, str]]:
    """label -> (return code, compiler output) for every Metal variant."""
    clang = clang or find_clang()
    if clang is None:
        raise FileNotFoundError("clang is not on PATH")
    cmd = [clang, "-x", "c++", "-std=c++17", "-fsyntax-only", "-Wno-unknown-attributes",
           "-I", str(HERE)]
    units = translation_units("metal")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = pool.map(lambda s: _compile(cmd, s, ".metal.cpp"), units.values())
        return dict(zip(units.keys(), results))


def check_cuda(nvcc: Optional[str] = None, ptxas_info: bool = False) -> Dict[str, Tuple[int, str]]:
    """label -> (return code, compiler output) for every CUDA variant (sm_90 cubin)."""
    cmd = _nvcc_cubin(nvcc, "/dev/null")
    if ptxas_info:
        cmd += ["-Xptxas", "-v"]
    units = translation_units("cuda")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = pool.map(lambda s: _compile(cmd, s, ".cu"), units.values())
        return dict(zip(units.keys(), results))


def _report(name: str, results: Dict[str, Tuple[int, str]], verbose: bool) -> bool:
    bad = {k: v for k, v in results.items() if v[0] != 0}
    print(f"{name}: {len(results) - len(bad)}/{len(results)} variants compile")
    for label, (_, log) in bad.items():
        print(f"--- {label} ---\n{log}")
    if verbose:
        for label, (_, log) in results.items():
            lines = [ln for ln in log.splitlines() if "registers" in ln or "spill" in ln]
            print(f"{label}: " + " | ".join(ln.split("info    :")[-1].strip() for ln in lines))
    return not bad


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--metal", action="store_true", help="check Metal with clang")
    ap.add_argument("--cuda", action="store_true", help="check CUDA with nvcc")
    ap.add_argument("--ptxas", action="store_true", help="print registers/spills of each CUDA kernel")
    ap.add_argument("--sass", nargs="?", const="", default=None, metavar="FILTER",
                    help="print static machine instructions of the CUDA variants whose label contains FILTER")
    ap.add_argument("--loops", metavar="FILTER", help="print each loop's machine instructions (needs cuobjdump, "
                    "nvdisasm) of the CUDA variants whose label contains FILTER")
    ap.add_argument("--dump", type=Path, help="write every generated translation unit here")
    args = ap.parse_args(argv)
    if args.loops is not None:
        try:
            print_loops(args.loops)
        except FileNotFoundError as e:
            print(e, file=sys.stderr)
            return 2
        return 0
    if args.sass is not None:
        for label, n in count_sass(args.sass).items():
            print(f"{n:6d}  {label}")
        return 0
    if not (args.metal or args.cuda):
        args.metal = args.cuda = True
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
        for target, ext in (("metal", ".metal"), ("cuda", ".cu")):
            for label, src in translation_units(target).items():
                (args.dump / (label + ext)).write_text(src)
    ok = True
    if args.metal:
        ok &= _report("metal (clang)", check_metal(), False)
    if args.cuda:
        ok &= _report("cuda (nvcc)", check_cuda(ptxas_info=args.ptxas), args.ptxas)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
