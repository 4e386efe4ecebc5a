"""Qwen3-MoE (``qwen3_moe``) streamed through StreamingMoE matches mlx-lm's resident model."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import _get_classes, load_model, quantize_model, save_config, save_model

import flash_moe
from flash_moe import convert
from flash_moe.tiny import write_tokenizer

from benchmarks.measure import ReadLog

CONFIG = {"model_type": "qwen3_moe", "hidden_size": 128, "num_hidden_layers": 3, "intermediate_size": 256,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "rms_norm_eps": 1e-6,
          "vocab_size": 320, "max_position_embeddings": 1024, "rope_theta": 1000000.0,
          "tie_word_embeddings": False, "num_experts": 8, "num_experts_per_tok": 2,
          "moe_intermediate_size": 64, "decoder_sparse_step": 1, "mlp_only_layers": [1],
          "norm_topk_prob": True, "eos_token_id": 2}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """An mlx-lm 4-bit qwen3_moe checkpoint (layer 1 dense) and its packed conversion."""
    root = tmp_path_factory.mktemp("qwen3_moe")
    mx.random.seed(3)
    model_cls, args_cls = _get_classes(CONFIG)
    model = model_cls(args_cls.from_dict(CONFIG))
    for layer in model.model.layers:  # a peaked router, so top-k is not a coin toss
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.weight = layer.mlp.gate.weight * 8
    model, config = quantize_model(model, dict(CONFIG), 64, 4, quant_predicate=model.quant_predicate)
    src = root / "mlx"
    src.mkdir()
    write_tokenizer(src)
    save_model(src, model)
    save_config(config, src / "config.json")
    return src, convert(src, root / "packed", progress=False)


def _logits(model, cache, tokens):
    return model(mx.array(tokens)[None], cache=cache)


def test_streamed_qwen3_moe_matches_mlx_lm(checkpoints):
    src, packed = checkpoints
    ref, _ = load_model(src)
    model, _ = flash_moe.load(packed)
    manifest = json.loads((packed / "manifest.json").read_text())
    assert sorted(l["layer"] for l in manifest["layers"]) == [0, 2]  # the dense layer stays resident
    prompt = [5, 17, 99, 3, 250, 42, 7]
    c_ref, c_ours = make_prompt_cache(ref), model.make_cache()
    a, b = _logits(ref, c_ref, prompt), _logits(model, c_ours, prompt)
    np.testing.assert_allclose(np.array(b), np.array(a), atol=1e-4, rtol=1e-4)
    toks_ref, toks = [], []
    ta = tb = int(mx.argmax(a[0, -1]))
    for _ in range(6):  # greedy decode, token by token
        toks_ref.append(ta)
        toks.append(tb)
        ta = int(mx.argmax(_logits(ref, c_ref, [ta])[0, -1]))
        tb = int(mx.argmax(_logits(model, c_ours, [tb])[0, -1]))
    assert toks == toks_ref
    assert model.expert_reader.stats.reads > 0


def test_qwen3_moe_reads_each_expert_once_per_layer_per_chunk(checkpoints):
    _, packed = checkpoints
    model, _ = flash_moe.load(packed)
    calls = ReadLog(model.expert_reader).__enter__().calls
    model(mx.array(list(range(3, 67)))[None], cache=model.make_cache())
    assert sorted(l for l, _ in calls) == [0, 2]
    for _, experts in calls:
        assert len(experts) == len(set(experts))


def test_qwen3_moe_with_speculative_cache_lookups_matches_mlx_lm(checkpoints):
    """The qwen3_moe model through the expert cache: the second greedy pass looks its slots up
    on the device (no reads, no undone steps) and still follows mlx-lm's tokens."""
    src, packed = checkpoints
    ref, _ = load_model(src)
    model, _ = flash_moe.load(packed, cache_bytes=64 << 20)
    source = model.expert_source

    def greedy(m, cache):
        tok = int(mx.argmax(_logits(m, cache, [5, 17, 99, 3])[0, -1]))
        out = [tok]
        for _ in range(6):
            tok = int(mx.argmax(_logits(m, cache, [tok])[0, -1]))
            out.append(tok)
        return out

    expected = greedy(ref, make_prompt_cache(ref))
    assert greedy(model, model.make_cache()) == expected
    before, failures, steps = model.expert_reader.stats.copy(), source.speculation_failures, source.speculative_steps
    assert greedy(model, model.make_cache()) == expected
    assert (model.expert_reader.stats - before).reads == 0
    assert source.speculative_steps - steps == 6 and source.speculation_failures == failures
