"""Kernels on the CPU: the reference path against independent references, the backend
switch, the generated Metal/CUDA sources (one text, two targets), a clang compile check of
every generated Metal function, and the shared kernel text run by a CPU SIMT simulator."""

from __future__ import annotations

import dataclasses
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.gated_delta import gated_delta_ops
from mlx_lm.models.switch_layers import SwitchGLU

import flash_moe.kernels as K
from flash_moe.kernels import codegen, launch, reference, sources
from flash_moe.kernels.reference import ExpertWeights, Projection

TOOLS = Path(__file__).resolve().parents[1] / "tools" / "metal_check"
sys.path.insert(0, str(TOOLS))
check = importlib.import_module("check")
simt = importlib.import_module("simt")


def rel(a, b) -> float:
    a, b = (f64(t) if isinstance(t, mx.array) else np.asarray(t, dtype=np.float64) for t in (a, b))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def f64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(np.float64)


# ---------------------------------------------------------------------------------------
# Independent references: dequantization from the packing definition, SwiGLU in float64
# ---------------------------------------------------------------------------------------

def np_dequantize(wq: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, gs: int) -> np.ndarray:
    """Element i of a row sits at bits (i % (32/bits))*bits of word i // (32/bits);
    value = q * scale + bias with one (scale, bias) per group of gs elements."""
    per_word = 32 // bits
    words = wq.astype(np.uint64)
    shifts = (np.arange(per_word, dtype=np.uint64) * bits)[None, :]
    q = (words[..., :, None] >> shifts) & np.uint64((1 << bits) - 1)
    q = q.reshape(*wq.shape[:-1], wq.shape[-1] * per_word).astype(np.float64)
    s = np.repeat(scales.astype(np.float64), gs, axis=-1)
    b = np.repeat(biases.astype(np.float64), gs, axis=-1)
    return q * s + b


def make_experts(U: int, H: int, I: int, bits: int, gs: int, sdt=mx.float32, seed: int = 0) -> ExpertWeights:
    mx.random.seed(seed)

    def proj(rows, cols):
        w = mx.random.normal((U, rows, cols)) / cols ** 0.5
        if bits == 16:
            return Projection(w.astype(sdt))
        q, s, b = mx.quantize(w, group_size=gs, bits=bits)
        return Projection(q, s.astype(sdt), b.astype(sdt))

    return ExpertWeights(proj(I, H), proj(I, H), proj(H, I), bits, gs)


def np_weights(p: Projection, bits: int, gs: int) -> np.ndarray:
    if bits == 16:
        return f64(p.weight)
    return np_dequantize(np.array(p.weight), f64(p.scales), f64(p.biases), bits, gs)


def np_expert_mlp(x, w: ExpertWeights, inds, scores) -> np.ndarray:
    g, u, d = (np_weights(p, w.bits, w.group_size) for p in (w.gate, w.up, w.down))
    x, inds, scores = f64(x), np.array(inds), f64(scores)
    out = np.zeros((x.shape[0], d.shape[1]))
    for n in range(x.shape[0]):
        for j, e in enumerate(inds[n]):
            a, b = g[e] @ x[n], u[e] @ x[n]
            out[n] += scores[n, j] * (d[e] @ (a / (1 + np.exp(-a)) * b))
    return out


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
def test_packing_matches_mlx_dequantize(bits, gs):
    w = mx.random.normal((3, 16, 256))
    q, s, b = mx.quantize(w, group_size=gs, bits=bits)
    ours = np_dequantize(np.array(q), f64(s), f64(b), bits, gs)
    np.testing.assert_allclose(ours, f64(mx.dequantize(q, s, b, group_size=gs, bits=bits)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("N", [1, 5, 20])  # 20 x 4 >= 64 takes the sorted gather path
def test_reference_expert_mlp_against_numpy(bits, N):
    w = make_experts(6, 128, 64, bits, 64)
    x = mx.random.normal((N, 128))
    inds = mx.array(np.random.default_rng(N).integers(0, 6, (N, 4)).astype(np.int32))
    scores = mx.softmax(mx.random.normal((N, 4)), axis=-1)
    assert rel(reference.expert_mlp(x, w, inds, scores), np_expert_mlp(x, w, inds, scores)) < 1e-5


@pytest.mark.parametrize("bits", [4, 2])
def test_reference_expert_mlp_against_mlx_lm_switchglu(bits):
    H, I, E, k = 128, 64, 8, 3
    mx.random.seed(3)
    glu = SwitchGLU(H, I, E)
    mx.eval(glu.parameters())
    nn.quantize(glu, group_size=64, bits=bits)
    x = mx.random.normal((5, H))
    inds = mx.array(np.random.default_rng(0).integers(0, E, (5, k)).astype(np.uint32))
    scores = mx.softmax(mx.random.normal((5, k)), axis=-1)
    expected = (glu(x, inds) * scores[..., None]).sum(axis=-2)

    def proj(layer):
        return Projection(layer.weight, layer.scales, layer.biases)

    w = ExpertWeights(proj(glu.gate_proj), proj(glu.up_proj), proj(glu.down_proj), bits, 64)
    assert rel(reference.expert_mlp(x, w, inds, scores), expected) < 1e-5


def test_reference_moe_combine_against_numpy():
    e, s, r = (mx.random.normal((3, 32)) for _ in range(3))
    gate = mx.random.normal((3, 1))
    expected = f64(r) + f64(e) + f64(s) / (1 + np.exp(-f64(gate)))
    assert rel(reference.moe_combine(e, s, gate, r), expected) < 1e-6


def _delta_inputs(B, HK, HV, DK, DV, dtype=mx.float32, seed=0):
    return reference.random_gated_delta_inputs(B, HK, HV, DK, DV, dtype, seed)


@pytest.mark.parametrize("shape", [(1, 2, 4, 16, 16), (2, 4, 4, 32, 8), (1, 2, 8, 64, 32)])
def test_reference_gated_delta_against_mlx_lm(shape):
    q, k, v, g, beta, state = _delta_inputs(*shape)
    y, s = reference.gated_delta_step(q, k, v, g, beta, state)
    y2, s2 = gated_delta_ops(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], state)
    assert rel(y, y2[:, 0]) < 1e-6 and rel(s, s2) < 1e-6


# ---------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------

def test_backend_switch(monkeypatch):
    assert mx.default_device() == mx.cpu or K.active_backend() in ("metal", "cuda")
    try:
        K.set_backend("reference")
        assert K.active_backend() == "reference"
        K.set_backend("auto")
        monkeypatch.setenv("FLASH_MOE_KERNELS", "reference")
        assert K.active_backend() == "reference"
        monkeypatch.delenv("FLASH_MOE_KERNELS")
        with mx.stream(mx.cpu):  # the CPU device never takes a GPU kernel
            with pytest.raises(ValueError):
                K.set_backend("fast")
    finally:
        K.set_backend("auto")
    if mx.default_device() == mx.cpu:
        assert K.active_backend() == "reference"
    # the context manager restores what was set before it, also after an error inside
    before = K._forced
    with pytest.raises(RuntimeError):
        with K.backend("reference"):
            assert K.active_backend() == "reference"
            raise RuntimeError
    assert K._forced == before


def test_public_api_matches_reference_on_cpu():
    if K.active_backend() != "reference":
        pytest.skip("a GPU backend is active")
    w = make_experts(4, 64, 64, 4, 64)
    x = mx.random.normal((2, 64))
    inds = mx.array([[0, 3], [1, 2]], dtype=mx.int32)
    scores = mx.softmax(mx.random.normal((2, 2)), axis=-1)
    np.testing.assert_array_equal(np.array(K.expert_mlp(x, w, inds, scores)),
                                  np.array(reference.expert_mlp(x, w, inds, scores)))
    sh, gate, res = mx.random.normal((2, 64)), mx.random.normal((2, 1)), mx.random.normal((2, 64))
    y = reference.expert_mlp(x, w, inds, scores)
    np.testing.assert_array_equal(np.array(K.expert_mlp_combine(x, w, inds, scores, sh, gate, res)),
                                  np.array(reference.moe_combine(y, sh, gate, res)))
    args = _delta_inputs(1, 2, 4, 16, 16)
    for a, b in zip(K.gated_delta_step(*args), reference.gated_delta_step(*args)):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    assert K.Projection is Projection and K.ExpertWeights is ExpertWeights


def test_unsupported_inputs_have_no_plan():
    A = launch.ArraySpec
    w16 = make_experts(2, 64, 64, 16, 64)
    x, inds, scores = A((1, 64), mx.float32), A((1, 2), mx.int32), A((1, 2), mx.float32)
    assert launch.plan_expert_mlp("cuda", x, w16, inds, scores) is None  # unquantized
    w4 = make_experts(2, 64, 64, 4, 64)
    assert launch.plan_expert_mlp("cuda", x, w4, inds, scores) is not None
    big = A((launch.MAX_TOKENS + 1, 64), mx.float32)
    many = A((launch.MAX_TOKENS + 1, 2), mx.int32)
    assert launch.plan_expert_mlp("cuda", big, w4, many, A(many.shape, mx.float32)) is None
    assert launch.plan_expert_mlp("cuda", A((1, 96), mx.float32), w4, inds, scores) is None  # shape mismatch
    assert launch.proj_layout(4096, 4) == (32, 32) and launch.proj_layout(1024, 2) == (64, 16)
    assert launch.proj_layout(96 * 3, 4) is None  # 9 chunks: not a power of two
    f = mx.float32
    assert launch.plan_gated_delta_step("cuda", A((1, 2, 12), f), A((1, 2, 12), f), A((1, 4, 8), f),
                                        A((1, 4), f), A((1, 4), f), A((1, 4, 8, 12), f)) is None


# ---------------------------------------------------------------------------------------
# Generated sources: one algorithm text, two targets
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", codegen.ALL_SPECS, ids=lambda s: s.name)
def test_both_targets_are_generated_from_one_text(spec):
    (mh, ms), (ch, cs) = codegen.render(spec, "metal"), codegen.render(spec, "cuda")
    assert spec.body in ms and spec.body in cs
    assert sources.HELPERS in mh and sources.HELPERS in ch
    assert ms.replace(codegen.METAL_BODY_PRELUDE, "") == cs.replace(codegen.CUDA_BODY_PRELUDE, "")
    assert mh.replace(codegen.METAL_MACROS, "") == ch.replace(codegen.CUDA_MACROS, "")
    assert "__syncthreads" not in ms and "threadgroup_barrier" not in cs
    # the Metal wrapper declares built-ins it finds in the body: the prelude must name them
    for builtin in ("threadgroup_position_in_grid", "thread_index_in_simdgroup"):
        assert builtin in ms
    assert spec.kernel_name("metal") != spec.kernel_name("cuda")


def test_every_input_dtype_is_a_template_value():
    """The CUDA backend caches kernels by name + template values only, so an input whose
    dtype varies must have it among the template values (h and state are always float32,
    weights uint32, indices and counts int32)."""
    fixed = {"h": mx.float32, "state": mx.float32}
    for target in ("metal", "cuda"):
        for label, plan in check.variants(target):
            tvals = set(str(v) for v in plan.template.values())
            for name, a in zip(plan.spec.inputs, plan.inputs):
                if name in fixed:
                    assert a.dtype == fixed[name], (label, name)
                    continue
                assert a.dtype in (mx.uint32, mx.int32) or str(a.dtype) in tvals, (label, name, a.dtype)


def test_metal_translation_unit_follows_mlx_wrapper():
    A = launch.ArraySpec
    w = make_experts(4, 64, 64, 4, 64)
    gu, _ = launch.plan_expert_mlp("metal", A((1, 64), mx.bfloat16), w, A((1, 2), mx.int32), A((1, 2), mx.float32),
                                   version=2)
    infos = [codegen.InputInfo(a.dtype, a.size, a.ndim) for a in gu.inputs]
    src = codegen.metal_translation_unit(gu.spec, infos, gu.out_dtypes, codegen.template_args(gu.spec, gu.template))
    assert "const device bfloat16_t* x [[buffer(0)]]" in src
    assert "const constant int32_t* inds [[buffer(7)]]" in src  # fewer than 8 elements
    assert "device float* h [[buffer(8)]]" in src
    assert "uint3 threadgroup_position_in_grid [[threadgroup_position_in_grid]]" in src
    assert ("template <int BITS, int GS, int D, int I, int K, int R, int W, int G, int DB, int PF, int HP, typename XT, "
            "typename ST>") in src


# ---------------------------------------------------------------------------------------
# Compile checks off the GPU
# ---------------------------------------------------------------------------------------

needs_clang = pytest.mark.skipif(check.find_clang() is None, reason="clang is not on PATH (CI installs it)")


@needs_clang
def test_generated_metal_compiles_with_clang():
    results = check.check_metal()
    assert len(results) >= 20
    failed = {k: log for k, (rc, log) in results.items() if rc != 0}
    assert not failed, "\n".join(f"--- {k}\n{v}" for k, v in failed.items())


@needs_clang
@pytest.mark.parametrize("bad_line, reason", [
    ("  undeclared_function(fm_tid);", "undeclared identifier"),
    ("  const device float* p = inds;", "address space"),   # a constant buffer as device
    ("  float z = simd_sum(1.0f) +;", "syntax"),
])
def test_metal_check_catches_errors(bad_line, reason, tmp_path):
    spec = dataclasses.replace(codegen.GATE_UP, body=codegen.GATE_UP.body + bad_line + "\n")
    A = launch.ArraySpec
    w = make_experts(4, 64, 64, 4, 64)
    gu, _ = launch.plan_expert_mlp("metal", A((1, 64), mx.float32), w, A((1, 2), mx.int32), A((1, 2), mx.float32),
                                   version=1)
    infos = [codegen.InputInfo(a.dtype, a.size, a.ndim) for a in gu.inputs]
    src = codegen.metal_translation_unit(spec, infos, gu.out_dtypes, codegen.template_args(spec, gu.template))
    path = tmp_path / "bad.metal.cpp"
    path.write_text(src)
    proc = subprocess.run([check.find_clang(), "-x", "c++", "-std=c++17", "-fsyntax-only",
                           "-Wno-unknown-attributes", "-I", str(TOOLS), str(path)], capture_output=True, text=True)
    assert proc.returncode != 0, reason


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.slow
def test_generated_cuda_compiles_with_nvcc():
    results = check.check_cuda()
    failed = {k: log for k, (rc, log) in results.items() if rc != 0}
    assert not failed, "\n".join(f"--- {k}\n{v}" for k, v in failed.items())


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cuda_dequantization_takes_one_lop3_per_element(monkeypatch):
    """The CUDA prelude's FM_AND_OR is one instruction where the plain (w & mask) | magic is
    two: the 4-bit gate/up kernel at the real shapes (256 weight elements a lane and item) has
    about 256 fewer machine instructions with it (static count of the sm_90 cubin)."""
    label = "v2_gate_up_pf_dh_D4096_I1024_b4_g64_N1_K10_float32_bfloat16"  # (the default: DH 9)
    fused = check.count_sass(label)[label]
    plain = codegen.CUDA_MACROS.replace("#define FM_AND_OR(a, b, c) fm_and_or((a), (b), (c))",
                                        "#define FM_AND_OR(a, b, c) (((a) & (b)) | (c))")
    assert plain != codegen.CUDA_MACROS
    monkeypatch.setitem(codegen._MACROS, "cuda", plain)
    unfused = check.count_sass(label)[label]
    assert unfused - fused >= 200, (fused, unfused)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_matrix_unit_threadgroups_fit_the_register_file(monkeypatch):
    """A v6 gate/up threadgroup asking more than 64K registers fails to launch (the H200 refused
    S8 WR2 PD4: 160 registers x 512 threads). Whatever shape is asked for, the planner shrinks
    the threadgroup until the registers ptxas gives the sm_90 kernel fit."""
    asked = [(4, mx.bfloat16, dict(S=8, WR=2, PD=4, XB=1)), (4, mx.float16, dict(S=8, WR=2, PD=4, XB=0)),
             (4, mx.float32, dict(S=16, WR=1, PD=2, XB=0)), (2, mx.float16, dict(S=8, WR=2, PD=2, XB=0)),
             (4, mx.bfloat16, dict(S=4, WR=4, PD=4, XB=0))]
    for bits, xdt, shape in asked:
        monkeypatch.setitem(launch.TUNING, "gate_up_mma", dict(launch.TUNING["gate_up_mma"], **shape))
        w = check._experts(10, 4096, 1024, bits, 64, mx.bfloat16)
        plans = launch.plan_expert_mlp("cuda", check.A((1, 4096), xdt), w, check.A((1, 10), mx.int32),
                                       check.A((1, 10), mx.bfloat16), version=6)
        (plan,) = [p for p in plans if p.spec.name.startswith("gate_up_mma")]
        regs = check.ptxas_registers(plan)
        assert regs * plan.group_size <= 65536, (bits, xdt, shape, plan.template, regs)
        assert plan.template["PD"] == shape["PD"]  # the blocks in flight stay as asked; the warps give way


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_v2_gate_up_fits_the_register_file(monkeypatch):
    """v2's gate/up threadgroup is as many warps as asked only where the registers ptxas gives
    the sm_90 kernel fit 64K: 16 with half-precision products (the default shape for a bfloat16
    x), 12 with float32 products, 8 at 8 bits (whose float kernel takes ~250 registers: the H200
    refused 12 warps of it, Run 16)."""
    monkeypatch.setitem(launch.TUNING, "gate_up_pf", dict(launch.TUNING["gate_up_pf"], W=16))
    for bits, xdt, hp, warps in [(4, mx.bfloat16, 2, 16), (4, mx.bfloat16, 1, 16), (2, mx.float16, 2, 16),
                                 (4, mx.float32, 2, 12), (2, mx.bfloat16, 0, 12), (8, mx.bfloat16, 2, 8),
                                 (8, mx.float32, 0, 8)]:
        monkeypatch.setitem(launch.TUNING, "gate_up_hp", dict(launch.TUNING["gate_up_hp"], W=16, HP=hp))
        w = check._experts(10, 4096, 1024, bits, 64, mx.bfloat16)
        plan = launch.plan_expert_mlp("cuda", check.A((1, 4096), xdt), w, check.A((1, 10), mx.int32),
                                      check.A((1, 10), mx.bfloat16), version=2)[0]
        assert plan.template["HP"] == (hp if xdt != mx.float32 else 0)
        assert plan.group_size == 32 * warps, (bits, xdt, hp, plan.template)
        regs = check.ptxas_registers(plan)
        assert regs * plan.group_size <= 65536, (bits, xdt, hp, regs)


def test_half_precision_products_only_on_cuda_with_half_width_x():
    """The _hp shapes (and HP) apply on CUDA where x is bfloat16 or float16; a float32 x and
    Metal keep the float32 shapes, and HP 0 in an _hp shape turns them off."""
    w = make_experts(4, 256, 128, 4, 64, mx.bfloat16)
    args = (launch.ArraySpec((1, 4), mx.int32), launch.ArraySpec((1, 4), mx.bfloat16))
    for target, xdt, want in [("cuda", mx.bfloat16, (2, 1)), ("cuda", mx.float16, (2, 1)),
                              ("cuda", mx.float32, (0, 0)), ("metal", mx.bfloat16, (0, 0))]:
        plans = launch.plan_expert_mlp(target, launch.ArraySpec((1, 256), xdt), w, *args, version=2)
        assert tuple(p.template["HP"] for p in plans) == want, (target, xdt)
        want_shape = ("gate_up_hp", "down_hp") if want[0] else ("gate_up_pf", "down_pf")
        assert plans[1].template["R"] == min(launch.TUNING[want_shape[1]]["R"], plans[1].template["RPT"])
    saved = dict(launch.TUNING["gate_up_hp"])
    try:
        launch.TUNING["gate_up_hp"] = dict(saved, HP=0)
        plans = launch.plan_expert_mlp("cuda", launch.ArraySpec((1, 256), mx.bfloat16), w, *args, version=2)
        assert [p.template["HP"] for p in plans] == [0, 1]
        launch.TUNING["gate_up_hp"] = dict(saved, HP=3)
        with pytest.raises(ValueError, match="HP must be 0, 1 or 2"):
            launch.plan_expert_mlp("cuda", launch.ArraySpec((1, 256), mx.bfloat16), w, *args, version=2)
    finally:
        launch.TUNING["gate_up_hp"] = saved


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_matrix_unit_down_fits_the_register_file(monkeypatch):
    """Down on the matrix units runs one warp per slot, so its threadgroup is K warps whatever the
    shape: there the blocks in flight give way. The H200 refused T1 PD8 with a float32 x (10 warps)
    although local sm_90 ptxas gives it 182 registers (58K a threadgroup): MLX's own build takes
    more, so the planner keeps to mma_registers, which is above what ptxas gives each shape."""
    monkeypatch.setitem(launch.TUNING, "gate_up_mma", dict(launch.TUNING["gate_up_mma"], MD=1))
    for bits, xdt, PD in [(4, mx.float32, 8), (4, mx.bfloat16, 8), (2, mx.float16, 8), (4, mx.bfloat16, 2)]:
        monkeypatch.setitem(launch.TUNING, "down_mma", dict(T=1, PD=PD, CS=2))
        w = check._experts(10, 4096, 1024, bits, 64, mx.bfloat16)
        plans = launch.plan_expert_mlp("cuda", check.A((1, 4096), xdt), w, check.A((1, 10), mx.int32),
                                       check.A((1, 10), mx.bfloat16), version=6)
        plan = plans[-1]
        assert plan.spec.name == "down_mma"
        regs = check.ptxas_registers(plan)
        asked = plan.group_size * launch.mma_registers(plan.template["P"], plan.template["PD"])
        assert regs <= launch.mma_registers(plan.template["P"], plan.template["PD"]) and asked <= 65536, (
            bits, xdt, PD, plan.template, regs)
        assert plan.template["PD"] <= PD and (PD == 2) <= (plan.template["PD"] == PD)


def test_ncu_sweep_counts_each_staging_launch_with_its_kernel(capsys):
    """tools/ncu_sweep.py reads Nsight Compute's CSV rows: v6's x staging (XB) counts with the
    gate/up launch after it, the h staging of down on the matrix units (MD) with the down launch."""
    spec = importlib.util.spec_from_file_location("ncu_sweep", TOOLS.parent / "ncu_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    names = ["stage_x_mma_1", "gate_up_mma_xb_2", "stage_h_mma_3", "down_mma_4"]
    rows = [{"ID": str(i), "Kernel Name": name, "Metric Name": "gpu__time_duration.sum", "Metric Value": str(us * 1000)}
            for i, (name, us) in enumerate(zip(names, (1.5, 20.0, 2.0, 6.0)))]
    best = sweep.report(rows, [({"S": 8, "MD": 1}, {"R": 1})], calls=1, bits=4, k=10, keep_l2=True)
    line = capsys.readouterr().out.splitlines()[-1].split()
    assert line[-7:-4] == ["21.5", "8.0", "29.5"]  # gate/up, down, sum (us); then GB/s, registers, occupancy
    assert line[-1] == "1.5/2.0"  # and the two staging launches' own times (us), inside those sums
    assert best == {"gate_up_mma": {"S": 8, "MD": 1}, "down_pf": {"R": 1}}
    best = sweep.report(rows, [({"R": 1, "W": 16, "HP": 2}, {"R": 4, "HP": 1})], calls=1, bits=4, k=10, keep_l2=True)
    assert best == {"gate_up_hp": {"R": 1, "W": 16, "HP": 2}, "down_hp": {"R": 4, "HP": 1}}


def test_sass_loop_bodies_are_found():
    """``check.py --loops`` reads loops off ``cuobjdump -sass`` text: the code from a backward
    branch's target to the branch, predicated opcodes counted by their opcode."""
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                 /* 0x00000a0000017a02 */
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;       /* 0x0000000402047981 */
        /*0020*/                   LOP3.LUT R6, R4, 0xf, R9, 0xea, !PT ;  /* 0x0000000f04067812 */
        /*0030*/                   FFMA R7, R6, R8, R7 ;                  /* 0x0000000806077223 */
        /*0040*/              @!P0 FFMA R7, R6, R8, R7 ;                  /* 0x0000000806078223 */
        /*0050*/               @P1 BRA 0x10 ;                             /* 0xfffffffc00b41947 */
        /*0060*/                   BRA 0x80 ;                             /* 0x0000000000047947 */
        /*0070*/                   EXIT ;                                 /* 0x000000000000794d */
    """
    ((start, end, ops),) = check.loop_bodies(sass)  # the forward branch is no loop
    assert (start, end) == (0x10, 0x50)
    assert ops == {"LDG": 1, "LOP3": 1, "FFMA": 2, "BRA": 1}


# ---------------------------------------------------------------------------------------
# The shared kernel text, run by the CPU SIMT simulator, against the reference
# ---------------------------------------------------------------------------------------

needs_cxx = pytest.mark.skipif(simt.find_compiler() is None, reason="no C++20 compiler on PATH")


def _placeholder(plan) -> int:
    """Index of the input that stands for the previous launch's output."""
    (i,) = [i for i, a in enumerate(plan.inputs) if isinstance(a, launch.ArraySpec)]
    return i


def _sim_expert_mlp(x, w, inds, scores, combine=None, version=1, out_dtype=None):
    plans = launch.plan_expert_mlp("cuda", x, w, inds, scores, combine, version=version, out_dtype=out_dtype)
    assert plans is not None
    assert (plans[0].spec.name in ("expert_mlp_sk", "expert_mlp_ska")) == (version in (4, 5))
    y = None
    for plan in plans:
        if y is not None:
            assert not bool(mx.isnan(y).any()), "gate_up left elements unwritten"
            plan.inputs[_placeholder(plan)] = y
        (y,) = simt.simulate(plan)
    if out_dtype is None:
        out_dtype = x.dtype if combine is None else mx.result_type(x.dtype, combine[0].dtype, combine[1].dtype)
    return y.astype(out_dtype)


@pytest.fixture
def float_down(monkeypatch):
    """v2's down in float32 products behind v6 (tests that hold v6's float32 sums to 1e-5; with a
    half-width x v2's down would multiply in half precision, launch.v2_shape)."""
    monkeypatch.setitem(launch.TUNING, "down_hp", dict(launch.TUNING["down_hp"], HP=0))


@pytest.fixture
def few_threadgroups(monkeypatch):
    """Launch shapes where every warp loops over several items (exercises the prefetch)."""
    monkeypatch.setitem(launch.TUNING, "gate_up_pf", {"R": 2, "W": 2, "tgs": 2})
    monkeypatch.setitem(launch.TUNING, "down_pf", {"R": 2, "tgs": 2})


@needs_cxx
@pytest.mark.parametrize("bits, H, I, N, K", [(4, 256, 128, 1, 3), (2, 512, 128, 2, 2), (8, 128, 64, 3, 2)])
def test_simulated_prefetching_kernels_with_looping_warps(bits, H, I, N, K, few_threadgroups):
    U = 4
    w = make_experts(U, H, I, bits, 64, mx.bfloat16, seed=bits + 1)
    x = mx.random.normal((N, H))
    inds = mx.array(np.random.default_rng(I).integers(0, U, (N, K)).astype(np.int32))
    scores = mx.softmax(mx.random.normal((N, K)), axis=-1)
    gate_up, down = launch.plan_expert_mlp("cuda", x, w, inds, scores, version=2)
    assert gate_up.template["K"] * gate_up.template["I"] // gate_up.template["G"] > 4 * gate_up.template["W"]
    assert down.template["RPT"] > 2 * down.template["R"]
    y = _sim_expert_mlp(x, w, inds, scores, version=2)
    assert rel(y, np_expert_mlp(x, w, inds, scores)) < 1e-5


@needs_cxx
@pytest.mark.parametrize("bits, H, I, R, tgs, iterations", [
    (4, 256, 128, 2, 16, 1),   # row pairs (4 lanes a row); the second register set is never used
    (4, 256, 128, 2, 4, 4),
    (4, 3072, 64, 1, 64, 3),   # 2 lanes a row, rows alone, an odd number of iterations
    (4, 3072, 64, 2, 32, 3),   # pairs, odd: the last iteration has no partner set
    (4, 3072, 64, 3, 16, 4),   # a pair and a row left over
    (2, 512, 64, 2, 2, 4),     # one lane a row: no pairs
    (4, 256, 1024, 2, 8, 16),  # 32 lanes a row, as at the real shapes
])
def test_simulated_down_rows_in_pairs(bits, H, I, R, tgs, iterations, monkeypatch):
    """v2's down sums two rows with one butterfly and computes its two register sets in turn;
    every row must land in its own slot, with odd iteration counts and rows left over."""
    monkeypatch.setitem(launch.TUNING, "down_pf", {"R": R, "tgs": tgs})
    U, N, K = 4, 1, 3
    w = make_experts(U, H, I, bits, 64, mx.bfloat16, seed=R + bits)
    x = mx.random.normal((N, H))
    inds = mx.array(np.random.default_rng(H + R).integers(0, U, (N, K)).astype(np.int32))
    scores = mx.softmax(mx.random.normal((N, K)), axis=-1)
    _, down = launch.plan_expert_mlp("cuda", x, w, inds, scores, version=2)
    t = down.template
    lanes_per_row = min(I * bits // 128, 32)
    assert t["R"] == R and t["RPT"] // (R * (32 // lanes_per_row)) == iterations
    y = _sim_expert_mlp(x, w, inds, scores, version=2)
    assert rel(y, np_expert_mlp(x, w, inds, scores)) < 1e-5


@needs_cxx
@pytest.mark.parametrize("tgs", [10, 14, 22])  # 5, 7, 11 per token of two
def test_simulated_gate_up_with_uneven_runs(tgs, monkeypatch):
    """A threadgroup count that does not divide the items: the last threadgroup's run is
    shorter, and every row is still computed once."""
    monkeypatch.setitem(launch.TUNING, "gate_up_pf", {"R": 2, "W": 2, "tgs": tgs})
    U, H, I, N, K = 4, 256, 128, 2, 3
    w = make_experts(U, H, I, 4, 64, mx.bfloat16, seed=11)
    x = mx.random.normal((N, H))
    inds = mx.array(np.random.default_rng(3).integers(0, U, (N, K)).astype(np.int32))
    scores = mx.softmax(mx.random.normal((N, K)), axis=-1)
    gate_up, _ = launch.plan_expert_mlp("cuda", x, w, inds, scores, version=2)
    t = gate_up.template
    items = t["K"] * t["I"] // (t["R"] * 4)  # 4 rows side by side in a warp at H = 256
    assert items % t["G"] != 0 and gate_up.n_groups == N * t["G"] <= tgs
    y = _sim_expert_mlp(x, w, inds, scores, version=2)
    assert rel(y, np_expert_mlp(x, w, inds, scores)) < 1e-5


def _merged(ranges):
    """Sorted, merged [start, end) byte ranges."""
    out = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [tuple(r) for r in out]


def _whole_experts(arr, experts, U):
    """Merged byte ranges of every row of ``experts`` in a stacked [U, rows, ...] array."""
    nbytes = arr.nbytes // U
    return _merged([(e * nbytes, (e + 1) * nbytes) for e in experts])


@needs_cxx
@pytest.mark.parametrize("pf, tgs, db", [(16, 2, 1), (16, 10, 1), (1, 2, 1), (2, 2, 1), (8, 2, 1), (16, 10, 0),
                                         (3, 2, 0)])
def test_simulated_l2_hints_cover_the_rows_read(pf, tgs, db, monkeypatch):
    """The L2 hints (FM_PREFETCH_L2) stay inside the inputs (the simulator checks every one),
    change no result (with or without gate/up's double buffer, DB), and cover what they promise:
    the whole run of each threadgroup (PF 16), every item of each warp after its first (PF 1-15,
    at any distance), down's rows."""
    monkeypatch.setitem(launch.TUNING, "gate_up_pf", {"R": 2, "W": 2, "tgs": tgs, "PF": pf, "DB": db})
    monkeypatch.setitem(launch.TUNING, "down_pf", {"R": 2, "tgs": 2, "PF": 1})
    U, H, I, N, K, bits = 6, 256, 128, 2, 3, 4
    w = make_experts(U, H, I, bits, 64, mx.bfloat16, seed=5)
    x = mx.random.normal((N, H))
    inds = mx.array(np.array([[4, 1, 5], [1, 0, 2]], dtype=np.int32))
    scores = mx.softmax(mx.random.normal((N, K)), axis=-1)
    gate_up, down = launch.plan_expert_mlp("cuda", x, w, inds, scores, version=2)
    assert gate_up.template["PF"] == pf and down.template["PF"] == 1
    hints = []
    (h,) = simt.simulate(gate_up, hints)
    down.inputs[0] = h
    down_hints = []
    (y,) = simt.simulate(down, down_hints)
    assert rel(y.astype(x.dtype), np_expert_mlp(x, w, inds, scores)) < 1e-5

    t, rows_per_item = gate_up.template, 2 * 4  # R = 2, 4 rows side by side in a warp at H = 256
    items, G, W = K * I // rows_per_item, t["G"], t["W"]
    run = -(-items // G)
    expected_rows = set()  # (expert, row) pairs the hints must bring
    for n in range(N):
        for g in range(G):
            first, last = g * run, min(items, (g + 1) * run)
            for it in range(first, last):
                if pf < 16 and (it - first) < W:  # a warp's first item is loaded directly
                    continue
                for r in range(it * rows_per_item, (it + 1) * rows_per_item):
                    expected_rows.add((int(inds[n, r // I]), r % I))
    for name, proj in (("wg", w.gate.weight), ("sg", w.gate.scales), ("bu", w.up.biases)):
        row_bytes = proj.nbytes // (U * I)
        want = _merged([((e * I + r) * row_bytes, (e * I + r + 1) * row_bytes) for e, r in expected_rows])
        assert _merged([(a, b) for n_, a, b in hints if n_ == name]) == want, name
    want = _whole_experts(w.down.weight, set(np.array(inds).ravel().tolist()), U)
    assert _merged([(a, b) for n_, a, b in down_hints if n_ == "wd"]) == want


@needs_cxx
@pytest.mark.parametrize("dh, tgs", [(1, 2), (5, 2), (9, 2), (9, 10), (3, 22)])
def test_simulated_gate_up_hints_down_rows(dh, tgs, monkeypatch):
    """With DH, v2's gate/up also hints down's rows into L2: every row of each token's experts
    (weights, scales, biases) once the warps got there, whatever the threadgroup count (22 leaves
    warps without items), and the result does not change. Metal has no hint: the plain kernel."""
    monkeypatch.setitem(launch.TUNING, "gate_up_pf", {"R": 2, "W": 2, "tgs": tgs, "DH": dh})
    monkeypatch.setitem(launch.TUNING, "down_pf", {"R": 2, "tgs": 2})
    U, H, I, N, K, bits = 6, 256, 128, 2, 3, 4
    w = make_experts(U, H, I, bits, 64, mx.bfloat16, seed=7)
    x = mx.random.normal((N, H))
    inds = mx.array(np.array([[4, 1, 5], [1, 0, 3]], dtype=np.int32))
    scores = mx.softmax(mx.random.normal((N, K)), axis=-1)
    assert launch.plan_expert_mlp("metal", x, w, inds, scores, version=2)[0].spec.name == "gate_up_pf"
    gate_up, down = launch.plan_expert_mlp("cuda", x, w, inds, scores, version=2)
    assert gate_up.spec.name == "gate_up_pf_dh" and gate_up.template["DH"] == dh
    hints = []
    (h,) = simt.simulate(gate_up, hints)
    down.inputs[0] = h
    (y,) = simt.simulate(down)
    assert rel(y.astype(x.dtype), np_expert_mlp(x, w, inds, scores)) < 1e-5
    experts = set(np.array(inds).ravel().tolist())
    for name, arr in (("wd", w.down.weight), ("sd", w.down.scales), ("bd", w.down.biases)):
        assert _merged([(a, b) for n_, a, b in hints if n_ == name]) == _whole_experts(arr, experts, U), name
    assert not [n_ for n_, _, _ in hints if n_ not in ("wd", "sd", "bd")]  # (PF is 0)


@needs_cxx
@pytest.mark.parametrize("dh, xb, tgs", [(1, 0, 2), (9, 1, 2), (5, 1, 3), (9, 0, 40)])
def test_simulated_matrix_unit_gate_up_hints_down_rows(dh, xb, tgs, monkeypatch, float_down):
    """v6's gate/up with DH hints down's rows as v2's does, counted in rounds: every row of each
    token's experts, with or without x staged per token (XB), with 40 threadgroups asked for 24
    items (one item each: half the warps have none), and the result does not change; on Metal the
    plain kernel."""
    monkeypatch.setitem(launch.TUNING, "gate_up_mma", {"S": 2, "WR": 2, "PD": 2, "tgs": tgs, "CS": 2, "RBM": 2,
                                                        "PF": 0, "XB": xb, "DH": dh})
    U, H, I, N, K = 6, 256, 64, 2, 3
    w = make_experts(U, H, I, 4, 64, mx.bfloat16, seed=11)
    x = mx.random.normal((N, H)).astype(mx.bfloat16)
    inds = mx.array(np.array([[4, 1, 5], [1, 0, 3]], dtype=np.int32))
    scores = mx.softmax(mx.random.normal((N, K)), axis=-1)
    metal = launch.plan_expert_mlp("metal", x, w, inds, scores, version=6)
    assert "dh" not in " ".join(p.spec.name for p in metal)
    plans = launch.plan_expert_mlp("cuda", x, w, inds, scores, version=6, out_dtype=mx.float32)
    *staged, gate_up, down = plans
    assert gate_up.spec.name == ("gate_up_mma_xb_dh" if xb else "gate_up_mma_dh") and gate_up.template["DH"] == dh
    if staged:
        (xs,) = simt.simulate(staged[0])
        gate_up.inputs[_placeholder(gate_up)] = xs
    hints = []
    (h,) = simt.simulate(gate_up, hints)
    down.inputs[0] = h
    (y,) = simt.simulate(down)
    assert rel(y, np_expert_mlp(x, w, inds, scores)) < 1e-5
    experts = set(np.array(inds).ravel().tolist())
    for name, arr in (("wd", w.down.weight), ("sd", w.down.scales), ("bd", w.down.biases)):
        assert _merged([(a, b) for n_, a, b in hints if n_ == name]) == _whole_experts(arr, experts, U), name
    assert not [n_ for n_, _, _ in hints if n_ not in ("wd", "sd", "bd")]  # (PF is 0)


@needs_cxx
@pytest.mark.parametrize("bits, H, I, N, K, xdt", [
    (4, 1024, 256, 1, 3, mx.bfloat16),   # 32 lanes a row
    (2, 1024, 256, 2, 2, mx.float16),    # fields above bit 10 of a half: shifted by 10
    (8, 256, 128, 1, 2, mx.bfloat16),    # one field a half below bit 10, one shifted by 8
    (4, 64, 64, 3, 2, mx.bfloat16),      # the tiny model: 2 lanes a row
])
@pytest.mark.parametrize("hp, tol", [(1, 8e-3), (2, 3e-3)])
def test_simulated_half_precision_products(bits, H, I, N, K, xdt, hp, tol, monkeypatch):
    """v2 with HP 1 / 2 (weights times x in half precision, two an instruction): the float32 sum
    is within the half-precision error of the float64 truth (HP 1 measured 2-5e-3, HP 2 ~1e-3,
    where float products give ~4e-7), also when x is scaled far outside half precision's range
    (each lane chunk's power-of-two scale), and a float32 x keeps float products."""
    monkeypatch.setitem(launch.TUNING, "gate_up_hp", dict(launch.TUNING["gate_up_hp"], HP=hp))
    monkeypatch.setitem(launch.TUNING, "down_hp", dict(launch.TUNING["down_hp"], HP=hp))
    U = 4
    w = make_experts(U, H, I, bits, 64, mx.bfloat16, seed=bits + hp)
    inds = mx.array(np.random.default_rng(H + N).integers(0, U, (N, K)).astype(np.int32))
    scores = mx.softmax(mx.random.normal((N, K)), axis=-1).astype(xdt)
    base = mx.random.normal((N, H))
    base = mx.where(mx.arange(H) < H // 4, 0.0, base)  # whole chunks of zeros
    f32_sum = dict(version=2, out_dtype=mx.float32)  # (what the MoE layer asks for)
    for scale in (1.0, 2.0 ** 40, 2.0 ** -60) if xdt == mx.bfloat16 else (1.0,):  # (float16's range)
        x = (base * scale).astype(xdt)
        plans = launch.plan_expert_mlp("cuda", x, w, inds, scores, **f32_sum)
        assert [p.template["HP"] for p in plans] == [hp, hp]
        y = _sim_expert_mlp(x, w, inds, scores, **f32_sum)
        truth = np_expert_mlp(x, w, inds, scores)
        assert not bool(mx.isnan(y).any())
        assert rel(y, truth) < tol, (scale, rel(y, truth))
    scores = scores.astype(mx.float32)
    plans = launch.plan_expert_mlp("cuda", base, w, inds, scores, **f32_sum)
    assert [p.template["HP"] for p in plans] == [0, 0]
    assert rel(_sim_expert_mlp(base, w, inds, scores, **f32_sum), np_expert_mlp(base, w, inds, scores)) < 1e-5


@needs_cxx
@pytest.mark.parametrize("bits, gs, H, I, N, K, xdt, sdt", [
    (4, 64, 64, 64, 1, 2, mx.float32, mx.float32),       # the tiny model: 2 lanes per row
    (4, 64, 64, 64, 1, 1, mx.float32, mx.float32),       # k=1: 64 rows summed by 32 threads
    (2, 64, 64, 64, 3, 2, mx.float32, mx.bfloat16),
    (8, 32, 128, 64, 2, 3, mx.float16, mx.float16),
    (4, 128, 1024, 256, 1, 4, mx.float32, mx.bfloat16),  # 32 lanes per row
    (2, 64, 2048, 128, 2, 2, mx.bfloat16, mx.float32),
])
@pytest.mark.parametrize("version", [1, 2, 4])
def test_simulated_expert_kernels_match_reference(bits, gs, H, I, N, K, xdt, sdt, version):
    U = 5
    w = make_experts(U, H, I, bits, gs, sdt, seed=bits)
    x = mx.random.normal((N, H)).astype(xdt)
    inds = mx.array(np.random.default_rng(H).integers(0, U, (N, K)).astype(np.int32))
    scores = mx.softmax(mx.random.normal((N, K)), axis=-1).astype(xdt)
    y = _sim_expert_mlp(x, w, inds, scores, version=version)
    assert y.dtype == xdt and not bool(mx.isnan(y).any())
    exact = np_expert_mlp(x, w, inds, scores)
    assert rel(y, exact) < (1e-5 if xdt == mx.float32 else 1e-2)


@needs_cxx
@pytest.mark.parametrize("bits, gs, H, I, N, K, xdt, sdt", [
    (4, 64, 1024, 256, 1, 4, mx.float32, mx.bfloat16),
    (4, 128, 1024, 128, 2, 2, mx.bfloat16, mx.float32),  # float32 scales; one group per down row
    (2, 64, 2048, 128, 1, 3, mx.float32, mx.bfloat16),
    (8, 32, 512, 64, 1, 2, mx.float16, mx.float16),      # two down groups per chunk: the word's halves
])
@pytest.mark.parametrize("P, RD", [(4, 4), (2, 1), (3, 2)])
def test_simulated_staged_split_k_matches_reference(bits, gs, H, I, N, K, xdt, sdt, P, RD, monkeypatch):
    """v5: every warp's stages go around its ring several times; the simulator delivers each
    asynchronous copy only at the wait that retires it, so a stage read early reads stale data."""
    monkeypatch.setitem(launch.TUNING, "expert_mlp_ska", {"C": 64, "W": 2, "R": 1, "RD": RD, "P": P})
    U = 5
    w = make_experts(U, H, I, bits, gs, sdt, seed=bits + P)
    x = mx.random.normal((N, H)).astype(xdt)
    inds = mx.array(np.random.default_rng(H + P).integers(0, U, (N, K)).astype(np.int32))
    scores = mx.softmax(mx.random.normal((N, K)), axis=-1).astype(xdt)
    (plan,) = launch.plan_expert_mlp("cuda", x, w, inds, scores, version=5)
    t = plan.template
    assert plan.spec.name == "expert_mlp_ska" and t["P"] == P and plan.shared_memory > 0
    assert t["C"] // t["R"] // t["W"] > P  # the gate/up stages wrap around the ring
    y = _sim_expert_mlp(x, w, inds, scores, version=5)
    assert y.dtype == xdt and not bool(mx.isnan(y).any())
    assert rel(y, np_expert_mlp(x, w, inds, scores)) < (1e-5 if xdt == mx.float32 else 1e-2)


@needs_cxx
@pytest.mark.parametrize("layout", ["cuda", "metal"])
@pytest.mark.parametrize("bits, gs, H, I, N, K, xdt, sdt, cs", [
    (4, 64, 256, 64, 1, 2, mx.bfloat16, mx.bfloat16, 2),   # the decode case: 1 piece, 2 groups
    (4, 64, 256, 64, 2, 3, mx.float32, mx.bfloat16, 2),    # 3 pieces x 2 groups: 6 columns, CS 1
    (2, 64, 512, 64, 1, 3, mx.bfloat16, mx.float32, 2),    # 2-bit: 3 fields per view, 4 groups
    (2, 128, 512, 128, 2, 2, mx.float16, mx.bfloat16, 1),  # 2 pieces x 2 groups, CS 1
    (4, 128, 1024, 128, 1, 3, mx.float16, mx.float32, 2),  # one group per block
    (4, 32, 256, 64, 1, 3, mx.bfloat16, mx.float16, 2),    # a group per chunk
])
@pytest.mark.parametrize("xb", [0, 1], ids=["staged-per-threadgroup", "staged-per-token"])
def test_simulated_matrix_unit_gate_up_matches_reference(layout, bits, gs, H, I, N, K, xdt, sdt, cs, xb, monkeypatch, float_down):
    """v6 under both targets' matrix-unit lane layouts (CUDA's mma.sync, Metal's 8x8 simdgroup
    matrices): warps that loop over rounds, carry their block ring into the next item and add
    the rows of several rounds after one barrier. Its h,
    through v2's down into a float32 sum, matches float64 to 1e-5 for every x dtype (x is split
    into exact bfloat16 pieces)."""
    monkeypatch.setitem(launch.TUNING, "gate_up_mma", {"S": 2, "WR": 2, "PD": 2, "tgs": N, "CS": cs, "RBM": 3, "XB": xb})
    U = 5
    w = make_experts(U, H, I, bits, gs, sdt, seed=bits + gs)
    x = mx.random.normal((N, H)).astype(xdt)
    inds = mx.array(np.random.default_rng(H + I).integers(0, U, (N, K)).astype(np.int32))
    scores = mx.softmax(mx.random.normal((N, K)), axis=-1)
    *staged, gate_up, down = launch.plan_expert_mlp(layout, x, w, inds, scores, version=6, out_dtype=mx.float32)
    t = gate_up.template
    assert gate_up.spec.name == ("gate_up_mma_xb" if xb else "gate_up_mma") and t["P"] == launch.MMA_PIECES[xdt]
    assert len(staged) == xb
    assert t["CS"] == (2 if t["P"] * (512 // bits) // gs <= 4 and cs == 2 else 1)
    assert -(-K * I // 16 // t["G"]) > 3 * t["W"] // t["S"]  # rounds in batches of 3 and a shorter one
    assert H // (512 // bits) // t["S"] >= 2 * t["PD"] or t["PD"] == H // (512 // bits) // t["S"]
    for plan in staged:  # x staged once per token (its padding words may stay unwritten)
        (xs,) = simt.simulate(plan, layout=layout)
        gate_up.inputs[_placeholder(gate_up)] = xs
    (h,) = simt.simulate(gate_up, layout=layout)
    assert not bool(mx.isnan(h).any()), "gate_up left elements unwritten"
    down.inputs[0] = h
    (y,) = simt.simulate(down)
    assert rel(y, np_expert_mlp(x, w, inds, scores)) < 1e-5


def _bf16_pieces(h: mx.array, pieces: int) -> mx.array:
    """h as the sum of its first ``pieces`` bfloat16 pieces (rounded to nearest, as the kernels split)."""
    out, rest = mx.zeros_like(h), h
    for _ in range(pieces):
        piece = rest.astype(mx.bfloat16).astype(mx.float32)
        out, rest = out + piece, rest - piece
    return out


@needs_cxx
@pytest.mark.parametrize("layout", ["cuda", "metal"])
@pytest.mark.parametrize("bits, gs, H, I, N, K, xdt, sdt, T, PD", [
    (4, 64, 256, 256, 1, 3, mx.bfloat16, mx.bfloat16, 1, 2),  # the decode case: h in 1 piece
    (4, 64, 256, 128, 2, 2, mx.float16, mx.float32, 2, 1),    # 2 pieces, 2 tiles a threadgroup
    (2, 64, 512, 256, 1, 3, mx.bfloat16, mx.float16, 4, 1),   # 2-bit: 3 fields per view, 4 groups
    (4, 128, 256, 256, 1, 2, mx.float32, mx.bfloat16, 1, 2),  # 3 pieces (exact), one group a block
    (4, 32, 256, 512, 1, 2, mx.bfloat16, mx.bfloat16, 2, 2),  # a group per chunk: 4 used columns
])
def test_simulated_matrix_unit_down_matches_v2s_down(layout, bits, gs, H, I, N, K, xdt, sdt, T, PD, monkeypatch, float_down):
    """v6 with MD: h staged per (token, slot) pair, then down on the matrix units, under both
    lane layouts. On an h already in as many bfloat16 pieces as x's dtype gives it, its sum
    matches v2's down on the same h to 1e-5; from gate/up's own h, the float64 reference to what
    the pieces keep (one: a bfloat16 h, as mlx-lm's SwitchGLU rounds it)."""
    monkeypatch.setitem(launch.TUNING, "gate_up_mma", dict(launch.TUNING["gate_up_mma"], S=2, WR=2, tgs=N, XB=0, MD=1))
    monkeypatch.setitem(launch.TUNING, "down_mma", {"T": T, "PD": PD, "CS": 2})
    U = 5
    w = make_experts(U, H, I, bits, gs, sdt, seed=bits + I)
    x = mx.random.normal((N, H)).astype(xdt)
    inds = mx.array(np.random.default_rng(H + I + N).integers(0, U, (N, K)).astype(np.int32))
    scores = mx.softmax(mx.random.normal((N, K)), axis=-1)
    gate_up, stage, down = launch.plan_expert_mlp(layout, x, w, inds, scores, version=6, out_dtype=mx.float32)
    t = down.template
    assert (stage.spec.name, down.spec.name) == ("stage_h_mma", "down_mma")
    assert (t["T"], t["PD"], t["P"]) == (T, PD, launch.MMA_PIECES[xdt]) and H // (16 * T) * N == down.n_groups
    *_, v2_down = launch.plan_expert_mlp(layout, x, w, inds, scores, version=2, out_dtype=mx.float32)
    assert v2_down.spec.name == "down_pf"
    (h,) = simt.simulate(gate_up, layout=layout)

    def mma_down(h):
        stage.inputs[0] = h
        (staged,) = simt.simulate(stage, layout=layout)
        down.inputs[0] = staged
        (y,) = simt.simulate(down, layout=layout)
        return y

    h_kept = _bf16_pieces(h, t["P"])  # (a power-of-two pre-scale does not change the pieces)
    v2_down.inputs[0] = h_kept
    (want,) = simt.simulate(v2_down)
    assert rel(mma_down(h_kept), want) < 1e-5
    tolerance = {1: 4e-3, 2: 2e-5, 3: 1e-5}[t["P"]]  # measured: 1.5-2.0e-3, 4e-6, 3e-6
    assert rel(mma_down(h), np_expert_mlp(x, w, inds, scores)) < tolerance


@needs_cxx
def test_simulated_matrix_unit_down_fuses_the_combine(monkeypatch):
    """v6 with MD and the combine fused into down: the last launch is down_combine_mma, and the
    result (float32 x: h in three pieces, exact) matches the reference to 1e-5."""
    monkeypatch.setitem(launch.TUNING, "gate_up_mma", dict(launch.TUNING["gate_up_mma"], S=2, WR=2, tgs=2, MD=1))
    w = make_experts(4, 256, 256, 4, 64, seed=7)
    x = mx.random.normal((2, 256))
    inds = mx.array([[0, 3], [2, 2]], dtype=mx.int32)
    scores = mx.softmax(mx.random.normal((2, 2)), axis=-1)
    sh, gate, res = mx.random.normal((2, 256)), mx.random.normal((2, 1)), mx.random.normal((2, 256))
    plans = launch.plan_expert_mlp("cuda", x, w, inds, scores, (sh, gate, res), version=6)
    assert [p.spec.name for p in plans][-2:] == ["stage_h_mma", "down_combine_mma"]
    y = _sim_expert_mlp(x, w, inds, scores, combine=(sh, gate, res), version=6)
    expected = reference.moe_combine(reference.expert_mlp(x, w, inds, scores), sh, gate, res)
    assert rel(y, expected) < 1e-5


@needs_cxx
@pytest.mark.parametrize("pf", [16, 1, 3])
def test_simulated_matrix_unit_l2_hints(pf, monkeypatch, float_down):
    """v6's L2 hints stay inside the inputs (the simulator checks each), change no result, and
    cover the weight rows of every item of the run (PF 16) or of every item after each warp's
    first (PF 1-15, at any distance)."""
    monkeypatch.setitem(launch.TUNING, "gate_up_mma", {"S": 2, "WR": 2, "PD": 2, "tgs": 1, "CS": 2, "RBM": 2, "PF": pf})
    U, H, I, K = 6, 256, 64, 3
    w = make_experts(U, H, I, 4, 64, mx.bfloat16, seed=9)
    x = mx.random.normal((1, H)).astype(mx.bfloat16)
    inds = mx.array(np.array([[4, 1, 5]], dtype=np.int32))
    scores = mx.softmax(mx.random.normal((1, K)), axis=-1)
    gate_up, down = launch.plan_expert_mlp("cuda", x, w, inds, scores, version=6, out_dtype=mx.float32)
    assert gate_up.template["PF"] == pf
    hints = []
    (h,) = simt.simulate(gate_up, hints)
    down.inputs[0] = h
    (y,) = simt.simulate(down)
    assert rel(y, np_expert_mlp(x, w, inds, scores)) < 1e-5
    row_bytes = w.gate.weight.nbytes // (U * I)
    items = K * I // 16
    wr = gate_up.template["W"] // gate_up.template["S"]
    hinted_items = range(items) if pf == 16 else range(wr, items)  # every warp's later items
    want = _merged([((int(inds[0, it * 16 // I]) * I + (it * 16) % I) * row_bytes,
                     (int(inds[0, it * 16 // I]) * I + (it * 16) % I + 16) * row_bytes) for it in hinted_items])
    assert _merged([(a, b) for n_, a, b in hints if n_ == "wg"]) == want


def test_matrix_unit_kernel_falls_back_where_it_does_not_apply():
    """8-bit weights, or a float32 x whose pieces need more than 8 columns: v2."""
    x32, x16 = mx.zeros((1, 512), mx.float32), mx.zeros((1, 512), mx.bfloat16)
    inds, scores = mx.array([[0, 1]], dtype=mx.int32), mx.ones((1, 2))
    cases = [(make_experts(3, 512, 64, 8, 64), x16), (make_experts(3, 512, 64, 2, 64), x32)]
    for w, x in cases:
        plans = launch.plan_expert_mlp("cuda", x, w, inds, scores, version=6)
        assert plans is not None and plans[0].spec.name in ("gate_up_pf", "gate_up_pf_dh")
    w = make_experts(3, 512, 64, 4, 64)
    plans = launch.plan_expert_mlp("cuda", x16, w, inds, scores, version=6)
    assert [p.spec.name for p in plans] == ["stage_x_mma", "gate_up_mma_xb", "down_pf"]  # (XB by default)
    # the B slots the planner sizes threadgroup memory with are the kernel's
    assert [launch.mma_b_slots(t, 2, 1) for t in ("cuda", "metal")] == [8, 8]
    assert [launch.mma_b_slots(t, 2, 2) for t in ("cuda", "metal")] == [8, 16]


def test_two_launch_kernels_write_the_asked_dtype():
    """The MoE layer asks for the routed sum in float32: v1's and v2's down kernel writes it
    directly (no cast launch after it); the default for every token count is v2, except one
    2-bit token on CUDA (v6, matrix units)."""
    w = make_experts(4, 64, 64, 4, 64, seed=2)
    x, inds, scores = mx.random.normal((1, 64)).astype(mx.bfloat16), mx.array([[0, 1]], dtype=mx.int32), mx.ones((1, 2))
    if launch.PROJECTION_VERSION == "auto":
        assert launch.default_version(1) == launch.default_version(8) == launch.default_version(8, 2) == 2
        assert launch.default_version(1, 2, "cuda") == 6 and launch.default_version(1, 2, "metal") == 2
    for version in (1, 2):
        plans = launch.plan_expert_mlp("cuda", x, w, inds, scores, version=version, out_dtype=mx.float32)
        assert plans[-1].out_dtypes == [mx.float32] and plans[-1].template["OutT"] == mx.float32
        assert launch.plan_expert_mlp("cuda", x, w, inds, scores, version=version)[-1].out_dtypes == [mx.bfloat16]
    assert launch.plan_expert_mlp("cuda", x, w, inds, scores, version=2, out_dtype=mx.int32) is None


def test_staged_split_k_falls_back_where_it_does_not_fit():
    """Rows shorter than a warp (the tiny models) take v4; the ring must fit in threadgroup
    memory (Metal: 32 KiB, so the real shapes do not fit there and Macs run v4)."""
    w = make_experts(4, 64, 64, 4, 64, seed=1)
    x, inds, scores = mx.random.normal((1, 64)), mx.array([[0, 1]], dtype=mx.int32), mx.ones((1, 2))
    assert launch.plan_expert_mlp("cuda", x, w, inds, scores, version=5)[0].spec.name == "expert_mlp_sk"
    big = launch.ArraySpec((1, 4096), mx.bfloat16)
    wb = ExpertWeights(*(Projection(launch.ArraySpec((8, r, c * 4 // 32), mx.uint32), launch.ArraySpec((8, r, c // 64), mx.bfloat16),
                                    launch.ArraySpec((8, r, c // 64), mx.bfloat16))
                         for r, c in ((1024, 4096), (1024, 4096), (4096, 1024))), 4, 64)
    ib, sb = launch.ArraySpec((1, 10), mx.int32), launch.ArraySpec((1, 10), mx.bfloat16)
    (cuda,) = launch.plan_expert_mlp("cuda", big, wb, ib, sb, version=5)
    assert cuda.spec.name == "expert_mlp_ska" and 48 * 1024 < cuda.shared_memory <= 227 * 1024
    assert launch.plan_expert_mlp("metal", big, wb, ib, sb, version=5)[0].spec.name == "expert_mlp_sk"


@needs_cxx
@pytest.mark.parametrize("version", [1, 2, 4])
def test_simulated_fused_combine_matches_reference(version):
    w = make_experts(4, 64, 64, 4, 64, seed=7)
    x = mx.random.normal((2, 64))
    inds = mx.array([[0, 3], [2, 2]], dtype=mx.int32)
    scores = mx.softmax(mx.random.normal((2, 2)), axis=-1)
    sh, gate, res = mx.random.normal((2, 64)), mx.random.normal((2, 1)), mx.random.normal((2, 64))
    y = _sim_expert_mlp(x, w, inds, scores, combine=(sh, gate, res), version=version)
    expected = reference.moe_combine(reference.expert_mlp(x, w, inds, scores), sh, gate, res)
    assert rel(y, expected) < 1e-5


@needs_cxx
@pytest.mark.parametrize("shape, dtype", [((3, 64), mx.float32), ((2, 3, 96), mx.bfloat16)])
def test_simulated_combine_matches_reference(shape, dtype):
    e, s, r = (mx.random.normal(shape).astype(dtype) for _ in range(3))
    gate = mx.random.normal(shape[:-1] + (1,)).astype(dtype)
    (out,) = simt.simulate(launch.plan_moe_combine("cuda", e, s, gate, r))
    expected = f64(r) + f64(e) + f64(s) / (1 + np.exp(-f64(gate)))
    assert out.dtype == dtype and rel(out, expected) < (1e-6 if dtype == mx.float32 else 1e-2)


@needs_cxx
@pytest.mark.parametrize("shape, dtype", [
    ((1, 2, 4, 16, 16), mx.float32), ((2, 2, 2, 256, 8), mx.float32), ((1, 4, 8, 128, 32), mx.bfloat16),
])
def test_simulated_gated_delta_matches_reference(shape, dtype):
    q, k, v, g, beta, state = _delta_inputs(*shape, dtype=dtype, seed=1)
    y, s = simt.simulate(launch.plan_gated_delta_step("cuda", q, k, v, g, beta, state))
    y_ref, s_ref = gated_delta_ops(*(a[:, None].astype(mx.float32) for a in (q, k, v, g, beta)), state)
    assert not bool(mx.isnan(s).any()) and y.dtype == dtype
    assert rel(s, s_ref) < 1e-6
    assert rel(y, y_ref[:, 0]) < (1e-5 if dtype == mx.float32 else 1e-2)


@pytest.fixture
def simulated_launches(monkeypatch):
    """``launch``'s kernels run by the CPU simulator: the replay cache's own path, off the GPU.
    Yields the list of plans made (one entry per planned launch)."""
    made = []

    def fake_kernel(target, spec, shared_memory=0):
        made.append(spec.name)
        return simt.kernel(target, spec, shared_memory)

    monkeypatch.setattr(launch, "_kernel", fake_kernel)
    monkeypatch.setattr(launch, "_replays", {})
    yield made


@needs_cxx
@pytest.mark.parametrize("version", [2, 4])
def test_replayed_launches_take_each_calls_arrays(version, simulated_launches, few_threadgroups):
    """Plans are made once per signature and replayed with later calls' arrays; a change of a
    launch shape in TUNING, or of a shape, plans again."""
    w = make_experts(4, 256, 128, 4, 64, seed=3)
    inds = mx.array([[0, 3]], dtype=mx.int32)
    sh, gate = mx.random.normal((1, 256)), mx.random.normal((1, 1))
    for step in range(3):  # new x, routing and residual every call, as in a decode
        x, res = mx.random.normal((1, 256)), mx.random.normal((1, 256))
        scores = mx.softmax(mx.random.normal((1, 2)), axis=-1)
        y = launch.expert_mlp("cuda", x, w, inds, scores, combine=(sh, gate, res), version=version)
        expected = reference.moe_combine(reference.expert_mlp(x, w, inds, scores), sh, gate, res)
        assert rel(y, expected) < 1e-5, step
        y32 = launch.expert_mlp("cuda", x, w, inds, scores, version=version, out_dtype=mx.float32)
        assert y32.dtype == mx.float32 and rel(y32, reference.expert_mlp(x, w, inds, scores)) < 1e-5
    planned = len(simulated_launches)
    # with the combine (v2: fused into down; v4: a second launch) and without: planned once each
    assert planned == {2: 4, 4: 3}[version] and len(launch._replays) == 2

    key = "expert_mlp_sk" if version == 4 else "gate_up_pf"
    t = dict(launch.tuning(key, 4))
    t["W"] = 1 if t["W"] > 1 else 2
    launch.TUNING_BITS[(key, 4)] = t
    try:
        y32 = launch.expert_mlp("cuda", x, w, inds, scores, version=version, out_dtype=mx.float32)
    finally:
        del launch.TUNING_BITS[(key, 4)]
    assert len(simulated_launches) == planned + {2: 2, 4: 1}[version]  # planned again
    assert rel(y32, reference.expert_mlp(x, w, inds, scores)) < 1e-5

    inds3 = mx.array([[0, 3, 1]], dtype=mx.int32)  # another k: another signature
    scores3 = mx.softmax(mx.random.normal((1, 3)), axis=-1)
    y32 = launch.expert_mlp("cuda", x, w, inds3, scores3, version=version, out_dtype=mx.float32)
    assert rel(y32, reference.expert_mlp(x, w, inds3, scores3)) < 1e-5


@needs_cxx
def test_replayed_combine_and_delta_steps(simulated_launches):
    shape = (1, 2, 4, 16, 16)
    for seed in (1, 2):
        q, k, v, g, beta, state = _delta_inputs(*shape, dtype=mx.float32, seed=seed)
        y, s = launch.gated_delta_step("cuda", q, k, v, g, beta, state)
        y_ref, s_ref = gated_delta_ops(*(a[:, None] for a in (q, k, v, g, beta)), state)
        assert rel(s, s_ref) < 1e-6 and rel(y, y_ref[:, 0]) < 1e-5
        e, sh, r = (mx.random.normal((2, 64)) for _ in range(3))
        gate = mx.random.normal((2, 1))
        out = launch.moe_combine("cuda", e, sh, gate, r, out_dtype=mx.bfloat16)
        assert out.dtype == mx.bfloat16 and rel(out, reference.moe_combine(e, sh, gate, r)) < 1e-2
    assert simulated_launches == ["gated_delta", "combine"]  # planned once each
    assert launch.gated_delta_step("cuda", q[..., :12], k[..., :12], v, g, beta, state) is None  # DK != state's


def test_launch_shapes_from_json_text_file_and_environment(tmp_path, monkeypatch):
    monkeypatch.setitem(launch.TUNING, "down_pf", dict(launch.TUNING["down_pf"]))
    monkeypatch.setitem(launch.TUNING, "gate_up_pf", dict(launch.TUNING["gate_up_pf"]))
    launch.load_tuning('{"down_pf": {"PF": 1}}')
    assert launch.TUNING["down_pf"]["PF"] == 1 and launch.TUNING["down_pf"]["R"] >= 1  # merged, not replaced
    f = tmp_path / "shapes.json"
    f.write_text('{"gate_up_pf": {"W": 16, "DB": 0}}')
    launch.load_tuning(str(f))
    assert launch.TUNING["gate_up_pf"]["W"] == 16 and launch.TUNING["gate_up_pf"]["DB"] == 0
    for text, words in (('{"gate_up": {"W": 2}, "nope": {}}', "nope"), ('{"down_pf": {"R": "2"}}', "down_pf"),
                        ("{not json", "not valid JSON"), (str(tmp_path / "missing.json"), "missing.json")):
        with pytest.raises(ValueError, match=words):
            launch.load_tuning(text)
    launch.load_tuning('{"gate_up_pf": {"PF": 17}}')  # merged, but no plan takes it
    w = make_experts(2, 64, 64, 4, 64)
    with pytest.raises(ValueError, match="PF 0-16"):
        launch.plan_expert_mlp("cuda", mx.zeros((1, 64)), w, mx.array([[0, 1]]), mx.ones((1, 2)), version=2)
    env = dict(__import__("os").environ, FLASH_MOE_TUNING=str(f))
    out = subprocess.run([sys.executable, "-c", "from flash_moe.kernels import launch; print(launch.TUNING['gate_up_pf'])"],
                         capture_output=True, text=True, env=env, check=True).stdout
    assert "'W': 16" in out and "'DB': 0" in out
