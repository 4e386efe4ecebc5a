"""Tiny random checkpoints in the Hugging Face format, for the demo and the tests.

They have the real structure of Qwen3.5-MoE (DeltaNet and attention layers, routed and
shared experts, the ``model.language_model.*`` names, fused expert tensors, norm weights
stored as offsets from 1, a vision tensor to drop) and a real byte-level BPE tokenizer,
so they exercise the same loading code as a downloaded model. Their weights are random:
what they generate is noise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

import mlx.core as mx
import numpy as np

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_config(**overrides: Any) -> Dict[str, Any]:
    """A small Qwen3.5-MoE config (text part); keyword arguments override any field."""
    text = {
        "model_type": "qwen3_5_moe_text",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "vocab_size": 320,
        "max_position_embeddings": 4096,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 64,
        "norm_topk_prob": True,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "full_attention_interval": 4,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                            "mrope_section": [11, 11, 10], "mrope_interleaved": True},
        "eos_token_id": 2,
    }
    text.update(overrides)
    n = text["num_hidden_layers"]
    text["layer_types"] = ["full_attention" if (i + 1) % text["full_attention_interval"] == 0
                           else "linear_attention" for i in range(n)]
    return text


def random_weights(text: Dict[str, Any], seed: int = 0, dtype=mx.float32) -> Dict[str, mx.array]:
    """Random weights under the names and layouts of a transformers Qwen3.5-MoE checkpoint."""
    rng = np.random.default_rng(seed)
    H, E, I, S = text["hidden_size"], text["num_experts"], text["moe_intermediate_size"], \
        text["shared_expert_intermediate_size"]

    def lin(out_dim, in_dim):
        return rng.standard_normal((out_dim, in_dim), dtype=np.float32) / np.sqrt(in_dim)

    def offset_norm(dim):  # stored as an offset from 1, as Qwen3.5 checkpoints do
        return 0.1 * rng.standard_normal(dim, dtype=np.float32)

    w: Dict[str, np.ndarray] = {
        "model.language_model.embed_tokens.weight": rng.standard_normal((text["vocab_size"], H), dtype=np.float32),
        "model.language_model.norm.weight": offset_norm(H),
        "lm_head.weight": lin(text["vocab_size"], H),
        "model.visual.patch_embed.proj.weight": lin(8, 8),  # a vision tensor the converter must drop
        "mtp.fc.weight": lin(H, 2 * H),  # multi-token-prediction head, dropped too
    }
    nk, nv, dk, dv = (text["linear_num_key_heads"], text["linear_num_value_heads"], text["linear_key_head_dim"],
                      text["linear_value_head_dim"])
    conv_dim = 2 * nk * dk + nv * dv
    nh, nkv, hd = text["num_attention_heads"], text["num_key_value_heads"], text["head_dim"]
    for i, kind in enumerate(text["layer_types"]):
        p = f"model.language_model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = offset_norm(H)
        w[f"{p}.post_attention_layernorm.weight"] = offset_norm(H)
        if kind == "linear_attention":
            a = f"{p}.linear_attn"
            w[f"{a}.in_proj_qkv.weight"] = lin(conv_dim, H)
            w[f"{a}.in_proj_z.weight"] = lin(nv * dv, H)
            w[f"{a}.in_proj_b.weight"] = lin(nv, H)
            w[f"{a}.in_proj_a.weight"] = lin(nv, H)
            w[f"{a}.conv1d.weight"] = 0.5 * rng.standard_normal((conv_dim, 1, text["linear_conv_kernel_dim"]),
                                                                dtype=np.float32)
            w[f"{a}.dt_bias"] = 1.0 + 0.1 * rng.standard_normal(nv, dtype=np.float32)
            w[f"{a}.A_log"] = np.log(rng.uniform(1, 16, nv)).astype(np.float32)
            w[f"{a}.norm.weight"] = 1.0 + 0.1 * rng.standard_normal(dv, dtype=np.float32)
            w[f"{a}.out_proj.weight"] = lin(H, nv * dv)
        else:
            a = f"{p}.self_attn"
            w[f"{a}.q_proj.weight"] = lin(2 * nh * hd, H)
            w[f"{a}.k_proj.weight"] = lin(nkv * hd, H)
            w[f"{a}.v_proj.weight"] = lin(nkv * hd, H)
            w[f"{a}.o_proj.weight"] = lin(H, nh * hd)
            w[f"{a}.q_norm.weight"] = offset_norm(hd)
            w[f"{a}.k_norm.weight"] = offset_norm(hd)
        m = f"{p}.mlp"
        w[f"{m}.gate.weight"] = lin(E, H) * 4  # a peaked router, so top-k is not a coin toss
        w[f"{m}.experts.gate_up_proj"] = np.stack([lin(2 * I, H) for _ in range(E)])
        w[f"{m}.experts.down_proj"] = np.stack([lin(H, I) for _ in range(E)])
        w[f"{m}.shared_expert.gate_proj.weight"] = lin(S, H)
        w[f"{m}.shared_expert.up_proj.weight"] = lin(S, H)
        w[f"{m}.shared_expert.down_proj.weight"] = lin(H, S)
        w[f"{m}.shared_expert_gate.weight"] = lin(1, H)
    return {k: mx.array(v).astype(dtype) for k, v in w.items()}


def split_experts(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """Rewrite fused expert tensors as one tensor per expert (``experts.{e}.gate_proj.weight``)."""
    out = {}
    for name, value in weights.items():
        if name.endswith("experts.gate_up_proj"):
            prefix, mid = name[: -len("gate_up_proj")], value.shape[1] // 2
            for e in range(value.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = value[e, :mid]
                out[f"{prefix}{e}.up_proj.weight"] = value[e, mid:]
        elif name.endswith("experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(value.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = value[e]
        else:
            out[name] = value
    return out


def write_tokenizer(path: Path) -> int:
    """A byte-level BPE tokenizer (256 byte tokens + chat specials); returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "chat_template": CHAT_TEMPLATE, "model_max_length": 4096}, indent=1))
    return tok.get_vocab_size()


def make_tiny_checkpoint(path: str | os.PathLike, *, seed: int = 0, dtype: str = "float32",
                         layout: str = "fused", shard_bytes: Optional[int] = None, **config: Any) -> Path:
    """Write a random Qwen3.5-MoE checkpoint in the Hugging Face format to ``path``.

    Args:
        layout: "fused" (transformers' ``experts.gate_up_proj``) or "per_expert".
        dtype: "float32", "bfloat16" or "float16".
        shard_bytes: split the weights into several safetensors files of about this size.
        **config: overrides of ``tiny_config``'s fields (sizes, expert count, top-k, ...).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    text = tiny_config(**config)
    n_tokens = write_tokenizer(path)
    if text["vocab_size"] < n_tokens:
        raise ValueError(f"vocab_size {text['vocab_size']} < tokenizer size {n_tokens}")
    full = {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
            "text_config": text, "vision_config": {"model_type": "qwen3_5_moe_vision", "depth": 1},
            "tie_word_embeddings": False}
    (path / "config.json").write_text(json.dumps(full, indent=1))
    weights = random_weights(text, seed, getattr(mx, dtype))
    if layout == "per_expert":
        weights = split_experts(weights)
    elif layout != "fused":
        raise ValueError(f"layout must be 'fused' or 'per_expert', not {layout!r}")
    save_sharded(weights, path, shard_bytes)
    return path


def save_sharded(weights: Dict[str, mx.array], path: Path, shard_bytes: Optional[int]) -> None:
    """Save as one or several safetensors files, with the usual index when sharded."""
    shards, current, size = [], {}, 0
    for name in sorted(weights):
        current[name] = weights[name]
        size += weights[name].nbytes
        if shard_bytes and size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(path / fname), shard, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    if len(shards) > 1:
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
