"""Our Qwen3.5-MoE against transformers' implementation (a second, independent reference).

Needs PyTorch, which CI does not install (a multi-GB download for one comparison); the test
runs where torch is present, e.g. on the lent GPU machine, and skips elsewhere.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

import flash_moe

torch = pytest.importorskip("torch")
pytest.importorskip("transformers.models.qwen3_5_moe")


def transformers_model(checkpoint):
    from safetensors.torch import load_file
    from transformers.models.qwen3_5_moe import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    text = json.loads((checkpoint / "config.json").read_text())["text_config"]
    config = Qwen3_5MoeTextConfig(**{k: v for k, v in text.items() if k != "model_type"})
    model = Qwen3_5MoeForCausalLM(config).float().eval()
    state = {}
    for name, value in load_file(str(checkpoint / "model.safetensors")).items():
        if name.startswith("model.language_model."):
            state["model." + name[len("model.language_model."):]] = value
        elif name == "lm_head.weight":
            state[name] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model


def test_logits_match_transformers(hf_checkpoint, packed16):
    ref = transformers_model(hf_checkpoint)
    ours, _ = flash_moe.load(packed16)
    tokens = [[5, 17, 99, 200, 3, 44, 61, 7, 8, 100, 101, 102, 150, 151, 152, 33]]
    with torch.no_grad():
        expected = ref(torch.tensor(tokens)).logits.numpy()
    # float32 on the CPU: a GPU's float32 matmul may round through TF32 (the GPU path has its
    # own test against the CPU, at 1e-3, in test_gpu_end_to_end.py)
    with mx.stream(mx.cpu):
        got = np.array(ours(mx.array(tokens)))
    assert np.abs(got - expected).max() < 1e-4
    assert (got.argmax(-1) == expected.argmax(-1)).all()
