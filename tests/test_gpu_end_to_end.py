"""On an MLX GPU (CUDA or Metal): the tiny models end to end, custom kernels against the
reference path. Skipped where MLX has no GPU (CI); run on the lent GPU."""

from __future__ import annotations

import mlx.core as mx
import pytest

import flash_moe
from flash_moe import kernels

gpu = pytest.mark.skipif(not (mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())),
                         reason="needs an MLX GPU backend")
pytestmark = [pytest.mark.gpu, gpu]

PROMPT = mx.array([[5, 17, 99, 200, 3, 44, 61, 7, 8, 100, 101, 102]])


def decode_logits(model, steps: int = 6) -> mx.array:
    cache = model.make_cache()
    logits = model(PROMPT, cache=cache)[:, -1]
    out = [logits]
    for _ in range(steps):
        logits = model(mx.argmax(logits, axis=-1)[:, None], cache=cache)[:, -1]
        out.append(logits)
    return mx.stack(out)


@pytest.mark.parametrize("bits", [4, 2])
def test_kernels_match_reference_end_to_end(hf_checkpoint, tmp_path, bits):
    packed = flash_moe.convert(hf_checkpoint, tmp_path / f"b{bits}", bits=bits, progress=False)
    model, _ = flash_moe.load(packed)
    assert kernels.active_backend() in ("cuda", "metal")
    fast = decode_logits(model)
    with kernels.backend("reference"):
        ref = decode_logits(model)
    assert mx.abs(fast - ref).max().item() < 1e-3
    assert (mx.argmax(fast, -1) == mx.argmax(ref, -1)).all().item()


@pytest.mark.parametrize("packed", ["packed16", "packed4"])
def test_gpu_matches_cpu(packed, request):
    """The whole model on the GPU (custom kernels, MLX CUDA ops) against the CPU's plain-MLX path."""
    model, _ = flash_moe.load(request.getfixturevalue(packed))
    on_gpu = decode_logits(model)
    mx.set_default_device(mx.cpu)
    try:
        model_cpu, _ = flash_moe.load(request.getfixturevalue(packed))
        on_cpu = decode_logits(model_cpu)
    finally:
        mx.set_default_device(mx.gpu)
    assert not mx.isnan(on_gpu).any().item()
    assert mx.abs(on_gpu - on_cpu).max().item() < 1e-3


def test_speculative_cache_lookups_on_gpu(packed4):
    """Decode with every expert in the device expert cache: after the first pass the steps look
    their slots up on the GPU (no reads, no undone steps) and match the resident model."""
    from flash_moe.io.format import load_manifest

    resident, _ = flash_moe.load(packed4, resident_experts=True)
    ref = decode_logits(resident)
    record = load_manifest(packed4).layout.record_size
    model, _ = flash_moe.load(packed4, cache_bytes=64 * record)
    decode_logits(model)  # fills the cache
    source = model.expert_source
    before, failures = model.expert_reader.stats.copy(), source.speculation_failures
    out = decode_logits(model)
    assert (model.expert_reader.stats - before).reads == 0
    assert source.speculation_failures == failures and source.speculating
    assert mx.abs(out - ref).max().item() < 1e-3


@pytest.mark.skipif(not (hasattr(mx, "cuda") and mx.cuda.is_available()), reason="CUDA managed memory only")
def test_cache_slots_move_to_device_memory_after_a_miss(packed4):
    """A miss writes its record into a cache slot from the CPU; the slot is then moved to device
    memory in bulk (the driver's last prefetch location of each written row is the GPU), so that
    hits read device memory instead of migrating pages at the GPU's faults. Rows never written
    were never moved, and decode from the slots matches the resident model."""
    import ctypes

    from flash_moe.io.format import load_manifest
    from flash_moe.kernels import cuda_driver

    resident, _ = flash_moe.load(packed4, resident_experts=True)
    ref = decode_logits(resident)
    record = load_manifest(packed4).layout.record_size
    model, _ = flash_moe.load(packed4, cache_bytes=2048 * record)  # megabytes between slot 0 and the used top
    out = decode_logits(model)
    source = model.expert_source
    used = sorted(set(source._slot_of.values()))
    assert 0 < len(used) < source.slots
    lib, ctx = cuda_driver.driver()[0]
    lib.cuCtxSetCurrent(ctx)

    def last_prefetch(view, row) -> int:  # CU_MEM_RANGE_ATTRIBUTE_LAST_PREFETCH_LOCATION (4)
        where = ctypes.c_int(-3)
        stride = view.strides[0]
        rc = lib.cuMemRangeGetAttribute(ctypes.byref(where), ctypes.c_size_t(4), ctypes.c_int(4),
                                        ctypes.c_uint64(view.ctypes.data + row * stride), ctypes.c_size_t(stride))
        assert rc == 0
        return where.value

    big = max(source._cache.views, key=lambda v: v.strides[0])  # the largest tensor (gate/up/down weights)
    assert all(last_prefetch(big, r) == 0 for r in used)
    unused = [r for r in range(source.slots) if r not in set(used)]
    assert last_prefetch(big, unused[0]) != 0  # (slots are handed out from the top)
    assert mx.abs(out - ref).max().item() < 1e-3
