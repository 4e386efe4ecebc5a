"""Compiled one-token steps (``flash_moe.models.compiled``) against the same steps op by op."""

from __future__ import annotations

import mlx.core as mx
import pytest

import flash_moe
from flash_moe import kernels
from flash_moe.io.format import load_manifest
from flash_moe.models import compiled

from test_streaming import decode


def traced(model) -> dict:
    """The compiled steps each layer part holds: {kind: count of traces}."""
    counts = {}
    for layer in model.layers:
        for part in (layer.mlp, getattr(layer, "linear_attn", None)):
            for key in getattr(part, "__dict__", {}).get("_compiled_steps", {}):
                kind = key[0] if isinstance(key[0], str) else key[0][0]  # "delta" or ("moe", ...)
                counts[kind] = counts.get(kind, 0) + 1
    return counts


def op_by_op(run):
    """run() with compiled steps off."""
    compiled.set_enabled(False)
    try:
        return run()
    finally:
        compiled.set_enabled(None)


@pytest.mark.parametrize("packed,cache_slots", [("packed4", 0), ("packed4", 32), ("packed16", 0), ("packed16", 32)])
def test_compiled_decode_matches_op_by_op(packed, cache_slots, request):
    """Resident experts, or every expert in the cache (speculative lookups), 4-bit or float
    experts: the decode with the DeltaNet mixers and MoE blocks compiled gives the op-by-op
    logits, and really is compiled."""
    path = request.getfixturevalue(packed)
    record = load_manifest(path).layout.record_size
    kw = {"cache_bytes": cache_slots * record} if cache_slots else {"resident_experts": True}
    model, _ = flash_moe.load(path, **kw)
    if cache_slots:
        decode(model)  # fill the cache: the next pass speculates
    ref = op_by_op(lambda: decode(model))
    before = model.expert_source.speculative_steps if cache_slots else 0
    out = decode(model)
    counts = traced(model)
    assert counts.get("moe") == len(model.moe_blocks())
    assert counts.get("delta") == sum(layer.is_linear for layer in model.layers)
    if cache_slots:
        assert model.expert_source.speculative_steps - before == 5
    assert mx.allclose(out, ref, rtol=1e-5, atol=1e-5).item()
    assert (mx.argmax(out, -1) == mx.argmax(ref, -1)).all().item()


def test_a_trace_follows_the_kernel_path(packed4):
    """Forcing the reference path after a decode traces again instead of replaying kernels that
    the switch turned off (and the switch back replays the first trace)."""
    model, _ = flash_moe.load(packed4, resident_experts=True)
    first = decode(model)
    with kernels.backend("reference"):
        ref = decode(model)
    again = decode(model)
    n_moe = len(model.moe_blocks())
    expected = n_moe if kernels.active_backend() == "reference" else 2 * n_moe  # one trace per path
    assert traced(model)["moe"] == expected
    assert mx.array_equal(first, again).item()
    assert mx.allclose(first, ref, rtol=1e-3, atol=1e-3).item()


def test_off_switch_runs_op_by_op(packed4, monkeypatch):
    monkeypatch.setenv("FLASH_MOE_COMPILE", "0")
    model, _ = flash_moe.load(packed4, resident_experts=True)
    decode(model)
    assert traced(model) == {}


def test_a_trace_follows_experts_per_token(packed4):
    """k is baked into a trace (it sets the router's top-k): changing it traces again, and the
    compiled decode at the new k matches the op-by-op one at that k."""
    model, _ = flash_moe.load(packed4, resident_experts=True)
    at_two = decode(model)
    model.set_experts_per_token(1)
    at_one = decode(model)
    assert mx.allclose(at_one, op_by_op(lambda: decode(model)), rtol=1e-5, atol=1e-5).item()
    assert not mx.allclose(at_one, at_two).item()
    assert traced(model)["moe"] == 2 * len(model.moe_blocks())


def test_compiled_batch_of_two_matches_op_by_op(packed4):
    """Two sequences at once: the DeltaNet step is compiled for B = 2 (the MoE block, with two
    rows, runs op by op) and gives the op-by-op logits."""
    model, _ = flash_moe.load(packed4, resident_experts=True)

    def run():
        cache = model.make_cache()
        logits = [model(mx.array([[5, 17, 99, 200], [3, 44, 61, 7]]), cache=cache)[:, -1]]
        for _ in range(4):
            logits.append(model(mx.argmax(logits[-1], axis=-1)[:, None], cache=cache)[:, -1])
        return mx.stack(logits)

    out = run()
    ref = op_by_op(run)
    assert out.shape[1] == 2 and traced(model).get("delta")
    assert mx.allclose(out, ref, rtol=1e-5, atol=1e-5).item()


def test_a_step_that_cannot_be_compiled_runs_op_by_op(packed4, monkeypatch):
    """A backend that fails to trace a step: a warning, then the op-by-op logits."""
    def broken(fn, inputs=None):
        def call(*args):
            raise ValueError("cannot trace this here")
        return call

    model, _ = flash_moe.load(packed4, resident_experts=True)
    ref = op_by_op(lambda: decode(model))
    monkeypatch.setattr(compiled.mx, "compile", broken)
    with pytest.warns(RuntimeWarning, match="runs op by op"):
        out = decode(model)
    assert mx.array_equal(out, ref).item()


def test_a_dropped_model_with_traces_is_freed(packed4):
    """The traces refer back to their layers (closures): dropping the model must still free it
    and its experts, as apps that load one model after another need."""
    import gc
    import weakref

    model, _ = flash_moe.load(packed4, resident_experts=True)
    decode(model)
    assert traced(model)
    source, block = weakref.ref(model.expert_source), weakref.ref(model.moe_blocks()[0])
    del model
    gc.collect()
    assert source() is None and block() is None
