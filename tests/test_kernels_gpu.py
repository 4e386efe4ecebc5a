"""The custom kernels on an MLX GPU backend (CUDA here, Metal on a Mac) against the
reference path, on fresh random inputs of the real Qwen3.5-397B shapes, with every output
poisoned with NaN before each launch. Skipped where no MLX GPU backend is present."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import flash_moe.kernels as K
from flash_moe.kernels import launch, reference
from flash_moe.kernels.reference import ExpertWeights, Projection

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(K.gpu_target() is None, reason="no MLX GPU backend (Metal or CUDA)"),
]

H, I = 4096, 1024  # Qwen3.5-397B-A17B hidden and expert sizes


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """NaN in every kernel output before it runs: an element a kernel skips stays NaN."""
    K.set_backend("auto")
    launch.POISON = float("nan")
    yield
    launch.POISON = None


def rel(a: mx.array, b: mx.array) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.linalg.norm(a - b) / mx.linalg.norm(b)).item()


def rel64(a: mx.array, b: mx.array) -> float:
    a, b = (np.array(t.astype(mx.float32)).astype(np.float64) for t in (a, b))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def experts(U: int, bits: int, sdt=mx.bfloat16, seed: int = 0, dims=(H, I)) -> ExpertWeights:
    mx.random.seed(seed)
    hidden, inter = dims

    def proj(rows, cols):
        q, s, b = mx.quantize(mx.random.normal((U, rows, cols)) / cols ** 0.5, group_size=64, bits=bits)
        return Projection(q, s.astype(sdt), b.astype(sdt))

    return ExpertWeights(proj(inter, hidden), proj(inter, hidden), proj(hidden, inter), bits, 64)


def upcast(w: ExpertWeights) -> ExpertWeights:
    f = lambda p: Projection(p.weight, p.scales.astype(mx.float32), p.biases.astype(mx.float32))  # noqa: E731
    return ExpertWeights(f(w.gate), f(w.up), f(w.down), w.bits, w.group_size)


def routing(N: int, k: int, U: int, seed: int):
    rng = np.random.default_rng(seed)
    inds = np.stack([rng.choice(U, k, replace=False) for _ in range(N)]).astype(np.int32)
    scores = mx.softmax(mx.random.normal((N, k)), axis=-1)
    return mx.array(inds), scores


def test_kernels_are_the_active_path():
    assert K.active_backend() in ("metal", "cuda")


@pytest.fixture(params=[1, 2, 4, 5, 6], ids=["v1", "v2", "v4", "v5", "v6"])
def projection_version(request, monkeypatch):
    """Every projection kernel version (v1 the fallback, v2 prefetching, v4 split-K, v5 split-K
    with asynchronously staged weights, v6 gate/up on the matrix units; at these shapes each runs
    its own kernel, except v6 with a float32 x at 4 bits, whose staged x does not fit: v2)."""
    monkeypatch.setattr(launch, "PROJECTION_VERSION", request.param)
    return request.param


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("k", [4, 10])
@pytest.mark.parametrize("N", [1, 4])
@pytest.mark.parametrize("xdt", [mx.float32, mx.bfloat16])
def test_expert_mlp(bits, k, N, xdt, projection_version):
    U = N * k
    w = experts(U, bits, seed=bits * 100 + k + N)
    x = mx.random.normal((N, H)).astype(xdt)
    inds, scores = routing(N, k, U, seed=k + N)
    scores = scores.astype(xdt)
    assert launch.plan_expert_mlp(K.active_backend(), x, w, inds, scores) is not None
    y = K.expert_mlp(x, w, inds, scores)
    # float32 truth on the same quantized weights (the reference in bf16 rounds h to bf16)
    ref = reference.expert_mlp(x.astype(mx.float32), upcast(w), inds, scores.astype(mx.float32))
    mx.eval(y, ref)
    assert y.shape == (N, H) and y.dtype == xdt
    assert not mx.isnan(y).any().item()
    assert rel(y, ref) < (1e-4 if xdt == mx.float32 else 1e-2)


@pytest.mark.parametrize("gate_up, down", [
    (dict(R=1, W=12, tgs=0, DB=1, PF=16), dict(R=1, tgs=256, PF=1)),  # L2 hints, double buffer
    (dict(R=1, W=12, tgs=0, DB=1, PF=2), dict(R=1, tgs=256, PF=0)),
    (dict(R=1, W=16, tgs=264, DB=0, PF=16), dict(R=2, tgs=128, PF=1)),  # no double buffer
    (dict(R=2, W=8, tgs=528, DB=0, PF=4), dict(R=1, tgs=512, PF=1)),
    (dict(R=1, W=12, tgs=0, DB=1, PF=0, DH=1), dict(R=1, tgs=256, PF=0)),  # gate/up hints down's rows
    (dict(R=1, W=12, tgs=0, DB=1, PF=0, DH=9), dict(R=1, tgs=256, PF=0)),
], ids=["hints-run", "hints-ahead", "single-buffer-run", "single-buffer-ahead", "down-hints-start",
        "down-hints-end"])
@pytest.mark.parametrize("bits, N, dims", [(4, 1, (H, I)), (2, 4, (H, I)), (4, 3, (64, 64))],
                         ids=["b4-N1", "b2-N4", "b4-tiny"])
def test_expert_mlp_v2_launch_variants(gate_up, down, bits, N, dims, monkeypatch):
    """v2's launch variants (L2 hints, gate/up without its double buffer, gate/up hinting down's
    rows) give the same sums; at the tiny shape a scale row is 2 bytes, shorter than a hint's
    16-byte granule."""
    monkeypatch.setattr(launch, "PROJECTION_VERSION", 2)
    monkeypatch.setitem(launch.TUNING, "gate_up_pf", gate_up)
    monkeypatch.setitem(launch.TUNING, "down_pf", down)
    k, U = 10, 12
    w = experts(U, bits, seed=bits + N, dims=dims)
    x = mx.random.normal((N, dims[0]))
    inds, scores = routing(N, k, U, seed=N)
    plans = launch.plan_expert_mlp(K.active_backend(), x, w, inds, scores)
    assert plans[0].spec.name == ("gate_up_pf_dh" if gate_up.get("DH") else "gate_up_pf")
    assert plans[0].template["DB"] == gate_up["DB"]
    y = K.expert_mlp(x, w, inds, scores)
    ref = reference.expert_mlp(x, upcast(w), inds, scores)
    assert not mx.isnan(y).any().item()
    assert rel(y, ref) < 1e-4


@pytest.mark.parametrize("hp, tol", [(1, 8e-3), (2, 3e-3)])
@pytest.mark.parametrize("bits, N, xdt, dims", [(4, 1, mx.bfloat16, (H, I)), (2, 1, mx.bfloat16, (H, I)),
                                                (4, 4, mx.float16, (H, I)), (8, 2, mx.bfloat16, (H, I)),
                                                (4, 3, mx.bfloat16, (64, 64))],
                         ids=["b4-N1", "b2-N1", "b4-N4-f16", "b8-N2", "b4-tiny"])
def test_expert_mlp_half_precision_products(hp, tol, bits, N, xdt, dims, monkeypatch):
    """v2 with HP 1 / 2 (HFMA2: weight pairs times x pairs in half precision; subnormal halves
    must not be flushed): the float32 sum is within half precision's error of the float32
    reference on the same x values, at x scaled by 1, 2^40 and 2^-60 (bfloat16 only)."""
    monkeypatch.setattr(launch, "PROJECTION_VERSION", 2)
    monkeypatch.setitem(launch.TUNING, "gate_up_hp", dict(launch.TUNING["gate_up_hp"], HP=hp))
    monkeypatch.setitem(launch.TUNING, "down_hp", dict(launch.TUNING["down_hp"], HP=hp))
    k, U = 10, 12
    w = experts(U, bits, seed=bits * 3 + N + hp, dims=dims)
    inds, scores = routing(N, k, U, seed=N + bits)
    base = mx.random.normal((N, dims[0]))
    for scale in (1.0, 2.0 ** 40, 2.0 ** -60) if xdt == mx.bfloat16 else (1.0,):
        x = (base * scale).astype(xdt)
        plans = launch.plan_expert_mlp(K.active_backend(), x, w, inds, scores, out_dtype=mx.float32)
        assert [p.template["HP"] for p in plans] == [hp, hp]
        y = K.expert_mlp(x, w, inds, scores, out_dtype=mx.float32)
        ref = reference.expert_mlp(x.astype(mx.float32), upcast(w), inds, scores)
        assert not mx.isnan(y).any().item()
        err = rel64(y, ref)  # (float32 norms of 2^40-sized sums would overflow)
        assert err < tol, (scale, err)


@pytest.mark.parametrize("mma", [dict(S=8, WR=1, PD=4, tgs=0), dict(S=4, WR=2, PD=2, tgs=0),
                                 dict(S=2, WR=4, PD=4, tgs=48), dict(S=8, WR=1, PD=1, tgs=0, CS=1),
                                 dict(S=8, WR=2, PD=2, tgs=0, PF=1, XB=1),
                                 dict(S=8, WR=2, PD=2, tgs=0, PF=1, XB=1, DH=9), dict(S=8, WR=1, PD=4, tgs=0, DH=1),
                                 dict(S=8, WR=2, PD=4, tgs=0, PF=1, XB=1)],
                         ids=["S8-PD4", "S4-WR2", "S2-WR4-few-groups", "CS1", "staged-per-token",
                              "staged-down-hints-end", "down-hints-start", "PD4-too-many-registers-asked"])
@pytest.mark.parametrize("bits, N, xdt", [(4, 1, mx.bfloat16), (2, 1, mx.bfloat16), (4, 3, mx.float16),
                                          (2, 2, mx.bfloat16)])
def test_expert_mlp_matrix_units(mma, bits, N, xdt, monkeypatch):
    """v6 (mma.sync on CUDA) at its launch shapes: the float32 sum matches the float32 reference
    on the same x values to 1e-5 (x's pieces are exact; the products are exact in float32)."""
    monkeypatch.setattr(launch, "PROJECTION_VERSION", 6)
    monkeypatch.setitem(launch.TUNING, "gate_up_mma", mma)
    monkeypatch.setitem(launch.TUNING, "down_hp", dict(launch.TUNING["down_hp"], HP=0))  # (down in float32)
    k, U = 10, 24
    w = experts(U, bits, seed=bits * 7 + N)
    x = mx.random.normal((N, H)).astype(xdt)
    inds, scores = routing(N, k, U, seed=N + bits)
    *staged, gate_up, _ = launch.plan_expert_mlp(K.active_backend(), x, w, inds, scores)
    assert gate_up.spec.name.startswith("gate_up_mma") and len(staged) == mma.get("XB", 0)
    assert gate_up.spec.name.endswith("_dh") == (bool(mma.get("DH")) and K.active_backend() == "cuda")
    assert gate_up.template["PD"] == min(mma["PD"], H // (512 // bits) // gate_up.template["S"])
    y = K.expert_mlp(x, w, inds, scores, out_dtype=mx.float32)
    ref = reference.expert_mlp(x.astype(mx.float32), upcast(w), inds, scores)
    assert not mx.isnan(y).any().item()
    assert rel(y, ref) < 1e-5


@pytest.mark.parametrize("down", [dict(T=1, PD=2), dict(T=2, PD=4), dict(T=1, PD=8)], ids=["T1-PD2", "T2-PD4", "T1-PD8"])
@pytest.mark.parametrize("bits, N, xdt", [(4, 1, mx.bfloat16), (2, 1, mx.bfloat16), (4, 3, mx.float16),
                                          (4, 1, mx.float32)])
def test_expert_mlp_down_on_matrix_units(down, bits, N, xdt, monkeypatch):
    """v6 with MD (down on the matrix units, h staged per pair): against the float32 reference on
    the same x, to what h's bfloat16 pieces keep (one for a bfloat16 x: ~2e-3 in the CPU simulator;
    two: ~4e-6; three: exact)."""
    monkeypatch.setattr(launch, "PROJECTION_VERSION", 6)
    monkeypatch.setitem(launch.TUNING, "gate_up_mma", dict(launch.TUNING["gate_up_mma"], MD=1))
    monkeypatch.setitem(launch.TUNING, "down_mma", dict(down, CS=2))
    k, U = 10, 24
    w = experts(U, bits, seed=bits * 5 + N)
    x = mx.random.normal((N, H)).astype(xdt)
    inds, scores = routing(N, k, U, seed=N + 2 * bits)
    *_, stage, down_plan = launch.plan_expert_mlp(K.active_backend(), x, w, inds, scores)
    assert (stage.spec.name, down_plan.spec.name) == ("stage_h_mma", "down_mma")
    y = K.expert_mlp(x, w, inds, scores, out_dtype=mx.float32)
    ref = reference.expert_mlp(x.astype(mx.float32), upcast(w), inds, scores)
    assert not mx.isnan(y).any().item()
    assert rel(y, ref) < {1: 5e-3, 2: 5e-5, 3: 1e-5}[launch.MMA_PIECES[xdt]]


@pytest.mark.parametrize("bits", [4, 2])
def test_expert_mlp_fused_combine(bits, projection_version):
    w = experts(10, bits, seed=5)
    x = mx.random.normal((1, H)).astype(mx.bfloat16)
    inds, scores = routing(1, 10, 10, seed=1)
    shared, gate, res = (mx.random.normal(s).astype(mx.bfloat16) for s in ((1, H), (1, 1), (1, H)))
    y = K.expert_mlp_combine(x, w, inds, scores, shared, gate, res)
    ref = reference.moe_combine(
        reference.expert_mlp(x.astype(mx.float32), upcast(w), inds, scores), shared, gate, res)
    assert not mx.isnan(y).any().item()
    assert rel(y, ref) < 1e-2


@pytest.mark.parametrize("shape, dtype", [((1, H), mx.bfloat16), ((7, H), mx.float32), ((2, 3, 64), mx.float16)])
def test_moe_combine(shape, dtype):
    e, s, r = (mx.random.normal(shape).astype(dtype) for _ in range(3))
    gate = mx.random.normal(shape[:-1] + (1,)).astype(dtype)
    out = K.moe_combine(e, s, gate, r)
    ref = reference.moe_combine(*(a.astype(mx.float32) for a in (e, s, gate, r)))
    assert out.dtype == dtype and not mx.isnan(out).any().item()
    assert rel(out, ref) < (1e-6 if dtype == mx.float32 else 1e-2)


@pytest.mark.parametrize("B, dtype", [(1, mx.float32), (1, mx.bfloat16), (4, mx.float32)])
def test_gated_delta_step(B, dtype):
    q, k, v, g, beta, state = reference.random_gated_delta_inputs(B, 16, 64, 128, 128, dtype)  # Qwen3.5-397B heads
    y, s = K.gated_delta_step(q, k, v, g, beta, state)
    y_ref, s_ref = reference.gated_delta_step(*(a.astype(mx.float32) for a in (q, k, v, g, beta)), state)
    assert not mx.isnan(s).any().item() and not mx.isnan(y).any().item()
    assert y.dtype == dtype
    assert rel(s, s_ref) < 1e-5
    assert rel(y, y_ref) < (1e-4 if dtype == mx.float32 else 1e-2)


@pytest.mark.parametrize("packed", ["packed4"])
def test_tiny_model_end_to_end(packed, request):
    """Greedy decoding of the tiny model: kernels vs the reference path, logits within 1e-3."""
    import faulthandler
    import sys

    import flash_moe

    # MLX CUDA compiles each float32 quantized matmul shape on first use: minutes on a fresh
    # machine (seen: >100 s before the first layer); a real hang still shows where it is.
    faulthandler.dump_traceback_later(480, exit=True, file=sys.stderr)

    path = request.getfixturevalue(packed)
    prompt = mx.array([[5, 17, 99, 200, 3, 44, 61, 7]])

    def run():
        model, _ = flash_moe.load(path)
        cache = model.make_cache()
        logits = [model(prompt, cache=cache)[:, -1]]
        for _ in range(6):
            tok = mx.argmax(logits[-1], axis=-1)
            logits.append(model(tok[:, None], cache=cache)[:, -1])
        return mx.stack(logits)

    with K.backend("reference"):
        ref = run()
        mx.eval(ref)
    ours = run()
    mx.eval(ours)
    faulthandler.cancel_dump_traceback_later()
    assert not mx.isnan(ours).any().item()
    assert mx.abs(ours - ref).max().item() < 1e-3


def test_bfloat16_model_half_precision_products_end_to_end(tmp_path, monkeypatch):
    """A bfloat16 tiny model on the kernels (v2 with half-precision products, the default for a
    bfloat16 x): fed the same tokens, its logits are no further from the same model run in float32
    activations than the bfloat16 reference path's are. (This random model is so sensitive to
    rounding that bfloat16 alone moves its logits by ~1.5 on a scale of ~3.6, CPU simulator: the
    kernels with float32 / HP 2 / HP 1 products 1.21 / 1.29 / 1.20; so this bounds, not pins.)"""
    import flash_moe
    from flash_moe import convert
    from flash_moe.tiny import make_tiny_checkpoint

    path = convert(make_tiny_checkpoint(tmp_path / "hf", dtype="bfloat16"), tmp_path / "p4", bits=4,
                   progress=False)
    prompt = mx.array([[5, 17, 99, 200, 3, 44, 61, 7]])

    def run(tokens=None, float32=False):
        model, _ = flash_moe.load(path)
        if float32:
            model.set_dtype(mx.float32)
        cache = model.make_cache()
        logits, fed = [model(prompt, cache=cache)[:, -1]], []
        for i in range(6):
            fed.append(mx.argmax(logits[-1], axis=-1) if tokens is None else tokens[i])
            logits.append(model(fed[-1][:, None], cache=cache)[:, -1])
        out = mx.stack(logits).astype(mx.float32)
        mx.eval(out)
        return out, fed

    with K.backend("reference"):
        ref, tokens = run()
        truth, _ = run(tokens, float32=True)
    plans_seen = []
    plan = launch.plan_expert_mlp

    def recording(*args, **kwargs):
        plans = plan(*args, **kwargs)
        plans_seen.extend(p.template.get("HP") for p in plans or ())
        return plans

    monkeypatch.setattr(launch, "plan_expert_mlp", recording)
    ours, _ = run(tokens)
    assert plans_seen and set(plans_seen) == {launch.TUNING["gate_up_hp"]["HP"], launch.TUNING["down_hp"]["HP"]}
    assert not mx.isnan(ours).any().item()
    err, err_ref = (mx.abs(a - truth).max().item() for a in (ours, ref))
    assert err <= 1.25 * err_ref, (err, err_ref)


def pack_records(w: ExpertWeights):
    """The layout and the packed records (one row each) of these experts, as conversion writes them."""
    from flash_moe.io.format import ExpertLayout
    from flash_moe.io.records import mx_dtype_name, pack_record

    U = w.gate.weight.shape[0]
    per = [{f"{p}.{f}": getattr(getattr(w, p), a)[u] for p in ("gate", "up", "down")
            for f, a in (("weight", "weight"), ("scales", "scales"), ("biases", "biases"))} for u in range(U)]
    layout = ExpertLayout.build({k: v.shape for k, v in per[0].items()}, {k: mx_dtype_name(v) for k, v in per[0].items()},
                                bits=w.bits, group_size=w.group_size, alignment=4096)
    return layout, np.stack([np.frombuffer(pack_record(t, layout), dtype=np.uint8) for t in per])


def through_records(w: ExpertWeights) -> ExpertWeights:
    """The same experts packed into records and unpacked as the loader does (into RecordArrays)."""
    from flash_moe.io.records import RecordArrays

    layout, records = pack_records(w)
    arrays = RecordArrays(layout, len(records))
    layout.scatter(records, arrays.views, np.arange(len(records)))
    return arrays.weights()


def test_host_kept_read_buffers_see_every_write():
    """The streaming read buffers (kept in host memory on CUDA, read by the GPU over the bus):
    the placement applies, and the kernels see each new set of records written into the same
    buffers, as the two-set ring reuses them layer after layer."""
    from flash_moe.io.records import RecordArrays

    U, k = 6, 4
    sets = [experts(U, 4, seed=40 + i) for i in range(3)]
    packed = [pack_records(w) for w in sets]
    layout = packed[0][0]
    dest = RecordArrays(layout, U, on_host=True)
    assert dest.on_host == (K.active_backend() == "cuda")
    x = mx.random.normal((1, H))
    inds, scores = routing(1, k, U, seed=3)
    for w, (_, records) in zip(sets + sets[:1], packed + packed[:1]):
        layout.scatter(records, dest.views, np.arange(U))
        y = K.expert_mlp(x, dest.weights(), inds, scores)
        ref = reference.expert_mlp(x, upcast(w), inds, scores)
        mx.eval(y, ref)
        assert rel(y, ref) < 1e-4


@pytest.mark.parametrize("source", ["quantize", "records"])
@pytest.mark.parametrize("sdt", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("dims", [(64, 64), (H, I)], ids=["tiny", "real"])
@pytest.mark.parametrize("N, U", [(1, 2), (8, 2), (1, 1)])
def test_expert_mlp_shapes_scales_and_records(dims, sdt, source, N, U):
    """The tiny test model's shapes (2 lanes per row), float32 scales, and weights that come
    through the loader's record arrays as it hands them to the kernels."""
    w = experts(U, 4, sdt=sdt, seed=U + N, dims=dims)
    if source == "records":
        w = through_records(w)
    x = mx.random.normal((N, dims[0]))
    inds, scores = routing(N, min(2, U), U, seed=N)
    assert launch.plan_expert_mlp(K.active_backend(), x, w, inds, scores) is not None
    y = K.expert_mlp(x, w, inds, scores)
    ref = reference.expert_mlp(x, upcast(w), inds, scores)
    mx.eval(y, ref)
    assert not mx.isnan(y).any().item()
    assert rel(y, ref) < 1e-4


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_gated_delta_step_tiny_heads(dtype):
    """The tiny test model's linear attention (2 key heads, 4 value heads, 16x16 state)."""
    q, k, v, g, beta, state = reference.random_gated_delta_inputs(1, 2, 4, 16, 16, dtype, seed=3)
    y, s = K.gated_delta_step(q, k, v, g, beta, state)
    y_ref, s_ref = reference.gated_delta_step(*(a.astype(mx.float32) for a in (q, k, v, g, beta)), state)
    assert not mx.isnan(y).any().item() and not mx.isnan(s).any().item()
    assert rel(s, s_ref) < 1e-5
    assert rel(y, y_ref) < (1e-4 if dtype == mx.float32 else 1e-2)


def test_float32_matmul_is_full_precision_in_the_tests():
    """The tests set MLX_ENABLE_TF32=0 (conftest): float32 matmuls then match the CPU's closely
    (with TF32, measured on an H100 with MLX 0.32.4: 2.9e-4), so GPU-vs-CPU logits can be held
    to 1e-3 end to end."""
    a, b = mx.random.normal((64, 256)), mx.random.normal((256, 64))
    gpu = a @ b
    with mx.stream(mx.cpu):
        cpu = a @ b
    err = rel(gpu, cpu)
    print(f"float32 matmul GPU vs CPU relative error: {err:.2e}")
    assert err < 1e-5, f"float32 matmul on this GPU is off by {err:.1e}: is MLX_ENABLE_TF32=0 honoured?"


@pytest.mark.parametrize("K_", [64, 4096], ids=["one-group", "real"])
def test_mlx_quantized_matmul_of_prompt_rows(K_):
    """MLX's own quantized matmul with 8 rows (a prompt) against the CPU. The resident layers of a
    real model (K = 4096) must be right; at K = group size MLX CUDA 0.32 is wrong on Hopper, and
    the loader keeps such layers dense (``loader._dequantize_single_group_layers``); this test
    says whether that is still needed."""
    mx.random.seed(3)
    w = mx.random.normal((256, K_)).astype(mx.bfloat16)
    x = mx.random.normal((8, K_)).astype(mx.bfloat16)
    wq, s, b = mx.quantize(w, 64, 4)
    gpu = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=4)
    with mx.stream(mx.cpu):  # float32 truth (MLX's CPU bf16 product is itself ~7e-2 off at K=4096)
        f32 = [a.astype(mx.float32) for a in (x, s, b)]
        cpu = mx.quantized_matmul(f32[0], wq, f32[1], f32[2], transpose=True, group_size=64, bits=4)
    err = rel(gpu, cpu)
    print(f"quantized_matmul bf16 M8 K{K_}: relative error {err:.2e}")
    if K_ == 64 and not err < 1e-2:  # NaN included
        pytest.xfail(f"MLX CUDA single-group quantized matmul is wrong here ({err:.1e}); worked around at load")
    assert err < 1e-2
