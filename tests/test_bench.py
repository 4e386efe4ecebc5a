"""The benchmark's building blocks, and the next-layer prefetch it measures."""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

import flash_moe

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import measure as M  # noqa: E402
from benchmarks.streaming import Table  # noqa: E402


def test_prefill_log_proves_one_read_per_expert_per_layer(packed4):
    model, _ = flash_moe.load(packed4)
    r = M.prefill(model, model.make_cache, 48, model.expert_reader)
    assert r["max_reads"] == 1 and r["calls_per_layer"] == 1
    assert r["bytes"] == r["records"] * model.expert_reader.record_size  # nothing came from a RAM cache


def test_read_log_counts_repeats(packed4):
    model, _ = flash_moe.load(packed4)
    with M.ReadLog(model.expert_reader) as log:
        model.expert_reader.read(0, [1, 2])
        model.expert_reader.read(0, [2, 3])
    assert log.max_reads_per_expert_per_layer() == 2
    assert model.expert_reader.read.__func__ is type(model.expert_reader).read  # restored


def test_prefetch_keeps_outputs_and_measures_its_guesses(packed4):
    model, _ = flash_moe.load(packed4)
    prompt = mx.array([[5, 17, 99, 3, 250]])
    ref = model(prompt, cache=model.make_cache())
    model.set_prefetch(True)
    out = model(prompt, cache=model.make_cache())
    np.testing.assert_array_equal(np.array(out), np.array(ref))
    assert model.expert_reader.prefetched > 0
    blocks = model.moe_blocks()
    assert blocks[0].prediction_counts[1] == 0  # nothing predicts the first MoE layer
    assert all(b.prediction_counts[1] > 0 for b in blocks[1:])
    assert 0.0 <= model.prefetch_accuracy() <= 1.0
    model.set_prefetch(False)
    assert all(b._next is None for b in blocks)


def test_raw_read_reads_every_record(packed4):
    files = sorted((Path(packed4) / "experts").glob("*.bin"))
    size = flash_moe.io.format.load_manifest(packed4).layout.record_size
    assert M.raw_read_gbps(files, size, [(0, 0), (1, 3), (0, 7)], threads=2) > 0


def test_table_marks_verdicts():
    t = Table()
    t.add("warm", "ratio", "0.9x", "3", ">= 0.8x", True)
    t.add("cold", "ratio", "1.3x", "3", "<= 1.15x", False)
    text = t.render()
    assert "MET" in text.splitlines()[2] and "MISSED" in text.splitlines()[3]


def test_synthetic_models_under_four_layers_have_a_full_attention_layer():
    """mlx-lm's Qwen3.5 model (the resident reference) needs one; 2- and 3-layer benchmark models
    used to fail deep inside it."""
    from benchmarks.synthetic import Shape, text_config

    for layers, wanted in ((2, [1]), (3, [2]), (6, [3]), (8, [3, 7])):
        types = text_config(Shape(layers=layers))["layer_types"]
        assert [i for i, t in enumerate(types) if t == "full_attention"] == wanted
