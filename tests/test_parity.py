"""Our Qwen3.5-MoE against mlx-lm's implementation, and streamed against resident."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load_model, quantize_model

import flash_moe

PROMPT = mx.array([[5, 17, 99, 200, 3, 44, 61, 7, 8, 100, 101, 102, 150, 151, 152, 33]])


def greedy(model, prompt: mx.array, steps: int):
    """Prefill then greedy decode with caches; returns (tokens, logits of every step)."""
    cache = model.make_cache()
    logits = model(prompt, cache=cache)[:, -1]
    tokens, all_logits = [], [logits]
    for _ in range(steps):
        tok = mx.argmax(logits, axis=-1)
        tokens.append(tok.item())
        logits = model(tok[:, None], cache=cache)[:, -1]
        all_logits.append(logits)
    return tokens, mx.stack(all_logits)


@pytest.fixture(scope="module")
def mlx_lm_model(hf_checkpoint):
    model, config = load_model(hf_checkpoint)
    return model, config


def test_unquantized_matches_mlx_lm(packed16, mlx_lm_model):
    ours, _ = flash_moe.load(packed16)
    ref, _ = mlx_lm_model
    assert mx.abs(ours(PROMPT) - ref(PROMPT)).max().item() < 1e-4
    ours_tokens, ours_logits = greedy(ours, PROMPT, 8)
    ref_tokens, ref_logits = greedy(ref, PROMPT, 8)
    assert ours_tokens == ref_tokens
    assert mx.abs(ours_logits - ref_logits).max().item() < 1e-4


def test_4bit_matches_mlx_lm_quantized_the_same_way(hf_checkpoint, packed4):
    ref, config = load_model(hf_checkpoint)
    ref, _ = quantize_model(ref, config, 64, 4, quant_predicate=ref.quant_predicate)
    ours, _ = flash_moe.load(packed4)
    assert mx.abs(ours(PROMPT) - ref(PROMPT)).max().item() < 1e-3
    ours_tokens, ours_logits = greedy(ours, PROMPT, 6)
    ref_tokens, ref_logits = greedy(ref, PROMPT, 6)
    assert ours_tokens == ref_tokens
    assert mx.abs(ours_logits - ref_logits).max().item() < 1e-3


def test_4bit_differs_from_unquantized(packed4, packed16):
    """The quantized path really quantizes (guards against a silent float fallback)."""
    q, _ = flash_moe.load(packed4)
    f, _ = flash_moe.load(packed16)
    a, b = q(PROMPT), f(PROMPT)
    assert mx.abs(a - b).max().item() > 1e-3
    # still the same model: quantization error well under the logits' own spread
    assert mx.abs(a - b).mean().item() < 0.5 * mx.abs(b).mean().item()


@pytest.mark.parametrize("packed", ["packed16", "packed4"])
def test_streamed_equals_resident_bit_for_bit(packed, request):
    path = request.getfixturevalue(packed)
    streamed, _ = flash_moe.load(path)
    resident, _ = flash_moe.load(path, resident_experts=True)
    np.testing.assert_array_equal(np.array(streamed(PROMPT)), np.array(resident(PROMPT)))
    s_tokens, s_logits = greedy(streamed, PROMPT, 6)
    r_tokens, r_logits = greedy(resident, PROMPT, 6)
    assert s_tokens == r_tokens
    np.testing.assert_array_equal(np.array(s_logits), np.array(r_logits))


def test_experts_per_token_can_be_lowered_and_raised(packed16):
    model, _ = flash_moe.load(packed16, experts_per_token=1)
    assert model.experts_per_token == 1
    low = model(PROMPT)
    model.set_experts_per_token(2)  # back to the config's value
    full, _ = flash_moe.load(packed16)
    np.testing.assert_array_equal(np.array(model(PROMPT)), np.array(full(PROMPT)))
    assert mx.abs(low - full(PROMPT)).max().item() > 1e-3
    with pytest.raises(ValueError, match="experts_per_token"):
        model.set_experts_per_token(9)


def test_single_group_layers_kept_dense_give_the_same_logits(packed4):
    """The MLX CUDA workaround (loader._dequantize_single_group_layers) changes no result."""
    import mlx.nn as nn

    from flash_moe import loader

    model, _ = flash_moe.load(packed4)
    prompt = mx.array([[5, 17, 99, 200, 3, 44, 61, 7]])
    before = model(prompt)
    loader._dequantize_single_group_layers(model)
    assert not [m for _, m in model.named_modules()
                if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and m.scales.shape[-1] == 1]
    assert mx.abs(model(prompt) - before).max().item() < 1e-5
