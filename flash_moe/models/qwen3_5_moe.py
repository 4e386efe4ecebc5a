"""Qwen3.5 MoE text model (``model_type`` "qwen3_5_moe"), hybrid Gated DeltaNet + gated attention.

Layer i is full attention when (i + 1) % full_attention_interval == 0, else Gated DeltaNet.
Every layer's feed-forward is a streaming sparse MoE with a sigmoid-gated shared expert.
The caches and the attention mask helpers are mlx-lm's, so mlx-lm's generation runs this model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs, create_attention_mask, create_ssm_mask, scaled_dot_product_attention
from mlx_lm.models.cache import ArraysCache, KVCache
from mlx_lm.models.rope_utils import initialize_rope

from .. import kernels
from . import compiled
from .moe import StreamingModel, StreamingMoE


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "qwen3_5_moe"
    hidden_size: int = 4096
    num_hidden_layers: int = 60
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    vocab_size: int = 248320
    max_position_embeddings: int = 262144
    linear_num_value_heads: int = 64
    linear_num_key_heads: int = 16
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    num_experts: int = 512
    num_experts_per_tok: int = 10
    moe_intermediate_size: int = 1024
    shared_expert_intermediate_size: int = 1024
    norm_topk_prob: bool = True
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    full_attention_interval: int = 4
    layer_types: Optional[List[str]] = None
    rope_parameters: Optional[Dict[str, Any]] = field(default_factory=lambda: {
        "rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25})
    rope_theta: Optional[float] = None
    partial_rotary_factor: Optional[float] = None

    def __post_init__(self):
        rope = dict(self.rope_parameters or {})
        if self.rope_theta is None:
            self.rope_theta = float(rope.get("rope_theta", 10000000.0))
        if self.partial_rotary_factor is None:
            self.partial_rotary_factor = float(rope.get("partial_rotary_factor", 0.25))
        if self.layer_types is None:
            self.layer_types = ["full_attention" if (i + 1) % self.full_attention_interval == 0 else
                                "linear_attention" for i in range(self.num_hidden_layers)]

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "ModelArgs":
        """From a Hugging Face config.json (text config nested under ``text_config`` or flat)."""
        return cls.from_dict(text_config(config))

    @property
    def rope_scaling(self) -> Optional[Dict[str, Any]]:
        rope = dict(self.rope_parameters or {})
        rope["type"] = rope.pop("rope_type", rope.get("type", "default"))
        return rope


def text_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """The flat text config, with the outer model_type kept."""
    flat = dict(config.get("text_config", config))
    flat["model_type"] = config.get("model_type", flat.get("model_type"))
    return flat


class RMSNormGated(nn.Module):
    """RMSNorm of the DeltaNet output, gated by SiLU(z) in float32."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones(dims)

    def __call__(self, x: mx.array, z: mx.array) -> mx.array:
        normed = mx.fast.rms_norm(x, self.weight, self.eps).astype(mx.float32)
        return (nn.silu(z.astype(mx.float32)) * normed).astype(x.dtype)


class GatedDeltaNet(nn.Module):
    """Linear attention with the gated delta rule over a causal depthwise convolution."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_k_heads = args.linear_num_key_heads
        self.num_v_heads = args.linear_num_value_heads
        self.head_k_dim = args.linear_key_head_dim
        self.head_v_dim = args.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.kernel_size = args.linear_conv_kernel_dim
        if self.num_v_heads % self.num_k_heads:
            raise ValueError("linear_num_value_heads must be a multiple of linear_num_key_heads")

        self.in_proj_qkv = nn.Linear(args.hidden_size, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(args.hidden_size, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(args.hidden_size, self.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(args.hidden_size, self.num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel_size, groups=self.conv_dim, bias=False)
        self.dt_bias = mx.ones(self.num_v_heads)
        self.A_log = mx.zeros(self.num_v_heads)
        self.norm = RMSNormGated(self.head_v_dim, args.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, args.hidden_size, bias=False)

    def __call__(self, x: mx.array, mask: Optional[mx.array], cache: Optional[ArraysCache]) -> mx.array:
        conv_state = cache[0] if cache is not None else None
        state = cache[1] if cache is not None else None
        if x.shape[1] == 1 and mask is None and conv_state is not None and state is not None and compiled.enabled():
            # a decode step after the prompt: a pure function of the cache's arrays, compiled
            step = compiled.step(self, "delta", lambda: lambda x, c, s: self.mix(x, None, c, s), inputs=[self])
            out, conv_state, state = step(x, conv_state, state)
        else:
            out, conv_state, state = self.mix(x, mask, conv_state, state)
        if cache is not None:
            cache[0], cache[1] = conv_state, state
            cache.advance(x.shape[1])
        return out

    def mix(self, x: mx.array, mask: Optional[mx.array], conv_state: Optional[mx.array],
            state: Optional[mx.array]):
        """(output, new conv state, new recurrent state) for ``x`` after those states."""
        B, S, _ = x.shape
        qkv = self.in_proj_qkv(x)
        z = self.in_proj_z(x).reshape(B, S, self.num_v_heads, self.head_v_dim)
        beta = mx.sigmoid(self.in_proj_b(x))
        a = self.in_proj_a(x)
        # decay in linear space: g = exp(-exp(A_log) * softplus(a + dt_bias)), in float32
        g = mx.exp(-mx.exp(self.A_log.astype(mx.float32)) * nn.softplus(a + self.dt_bias))

        if mask is not None:
            qkv = mx.where(mask[..., None], qkv, 0)
        if conv_state is None:
            conv_state = mx.zeros((B, self.kernel_size - 1, self.conv_dim), dtype=x.dtype)
        window = mx.concatenate([conv_state, qkv], axis=1)
        conv_state = mx.contiguous(window[:, -(self.kernel_size - 1):])
        mixed = nn.silu(self.conv1d(window))

        q, k, v = mx.split(mixed, [self.key_dim, 2 * self.key_dim], axis=-1)
        q = q.reshape(B, S, self.num_k_heads, self.head_k_dim)
        k = k.reshape(B, S, self.num_k_heads, self.head_k_dim)
        v = v.reshape(B, S, self.num_v_heads, self.head_v_dim)
        # L2-normalise q and k (eps 1e-6 on the sum of squares) and fold Dk^-1/2 into q
        scale = self.head_k_dim ** -0.5
        q = scale * scale * mx.fast.rms_norm(q, None, 1e-6 * scale * scale)
        k = scale * mx.fast.rms_norm(k, None, 1e-6 * scale * scale)

        if state is None:
            state = mx.zeros((B, self.num_v_heads, self.head_v_dim, self.head_k_dim), dtype=mx.float32)
        if S == 1 and mask is None:
            y, state = kernels.gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state)
            y = y[:, None]
        else:
            y, state = mx.fast.gated_delta_update(q, k, v, g, beta, state, mask)
        y = self.norm(y, z)
        return self.out_proj(y.reshape(B, S, -1)), conv_state, state


class Attention(nn.Module):
    """GQA attention with q/k RMSNorm, partial rotary embedding and a sigmoid output gate."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads = args.num_attention_heads
        self.num_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim ** -0.5
        bias = args.attention_bias
        # q_proj yields, per head, the query and its output gate side by side
        self.q_proj = nn.Linear(args.hidden_size, 2 * self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, args.hidden_size, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.rope = initialize_rope(int(self.head_dim * args.partial_rotary_factor), base=args.rope_theta,
                                    traditional=False, scaling_config=args.rope_scaling,
                                    max_position_embeddings=args.max_position_embeddings)

    def __call__(self, x: mx.array, mask: Optional[mx.array], cache: Optional[KVCache]) -> mx.array:
        B, L, _ = x.shape
        queries, gate = mx.split(self.q_proj(x).reshape(B, L, self.num_heads, 2 * self.head_dim), 2, axis=-1)
        keys = self.k_proj(x).reshape(B, L, self.num_kv_heads, self.head_dim)
        values = self.v_proj(x).reshape(B, L, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        queries = self.q_norm(queries).transpose(0, 2, 1, 3)
        keys = self.k_norm(keys).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        queries = self.rope(queries, offset=offset)
        keys = self.rope(keys, offset=offset)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
        out = scaled_dot_product_attention(queries, keys, values, cache=cache, scale=self.scale, mask=mask)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(out * mx.sigmoid(gate.reshape(B, L, -1)))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, index: int):
        super().__init__()
        self.is_linear = args.layer_types[index] == "linear_attention"
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(args)
        else:
            self.self_attn = Attention(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.mlp = StreamingMoE(index, args.hidden_size, args.num_experts, args.num_experts_per_tok,
                                args.norm_topk_prob, args.shared_expert_intermediate_size)

    def __call__(self, x: mx.array, mask: Optional[mx.array], cache: Any) -> mx.array:
        mixer = self.linear_attn if self.is_linear else self.self_attn
        h = x + mixer(self.input_layernorm(x), mask, cache)
        return self.mlp(self.post_attention_layernorm(h), residual=h)


class TextModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.first_linear = next((i for i, l in enumerate(self.layers) if l.is_linear), None)
        self.first_attention = next((i for i, l in enumerate(self.layers) if not l.is_linear), None)

    def __call__(self, inputs: mx.array, cache: Optional[list] = None,
                 input_embeddings: Optional[mx.array] = None) -> mx.array:
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        cache = cache if cache is not None else [None] * len(self.layers)
        attn_mask = create_attention_mask(h, cache[self.first_attention]) if self.first_attention is not None else None
        ssm_mask = create_ssm_mask(h, cache[self.first_linear]) if self.first_linear is not None else None
        for layer, c in zip(self.layers, cache):
            h = layer(h, ssm_mask if layer.is_linear else attn_mask, c)
        return self.norm(h)


class Model(StreamingModel, nn.Module):
    """The language model: ``model(inputs, cache=...)`` gives logits, as mlx-lm's models do."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = TextModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def forward(self, inputs: mx.array, cache: Optional[list] = None,
                input_embeddings: Optional[mx.array] = None) -> mx.array:
        h = self.model(inputs, cache, input_embeddings)
        return self.model.embed_tokens.as_linear(h) if self.args.tie_word_embeddings else self.lm_head(h)

    @property
    def layers(self) -> list:
        return self.model.layers

    def make_cache(self, max_kv_size: Optional[int] = None) -> list:
        """Per layer: the DeltaNet states, or a KV cache (a window of ``max_kv_size`` tokens when given)."""
        return [ArraysCache(size=2) if l.is_linear else self.attention_cache(max_kv_size) for l in self.layers]


# --- checkpoint names ------------------------------------------------------------------------
_DROP = re.compile(r"^(model\.visual\.|visual\.|vision_tower\.|mtp\.|model\.mtp\.)")
_NORMS = (".input_layernorm.weight", ".post_attention_layernorm.weight", ".q_norm.weight", ".k_norm.weight")
EXPERT_PATTERN = re.compile(r"^model\.layers\.(\d+)\.mlp\.(experts|switch_mlp)\.(.+)$")


def rename(name: str) -> Optional[str]:
    """A source checkpoint's tensor name in this model's namespace; None for tensors to drop."""
    if _DROP.match(name):
        return None
    for prefix, new in (("model.language_model.", "model."), ("language_model.model.", "model."),
                        ("language_model.lm_head.", "lm_head.")):
        if name.startswith(prefix):
            return new + name[len(prefix):]
    return name if name.startswith(("model.", "lm_head.")) else None


def sanitize(name: str, value: mx.array, hf_layout: bool) -> mx.array:
    """Bring one resident tensor (already renamed) to this model's conventions.

    Hugging Face checkpoints store conv1d weights as [C, 1, K] (MLX wants [C, K, 1]) and the
    decoder's RMSNorm weights as offsets from 1; mlx-lm checkpoints are already converted.
    """
    if name.endswith("conv1d.weight") and value.shape[-1] != 1:
        return value.moveaxis(2, 1)
    if hf_layout and value.ndim == 1 and (name.endswith(_NORMS) or name == "model.norm.weight"):
        return value + 1.0
    return value


def quant_predicate(name: str) -> Optional[Dict[str, int]]:
    """Bits for resident weights that need more than the default (the routers, as mlx-lm does)."""
    if name.endswith("mlp.gate") or name.endswith("shared_expert_gate"):
        return {"group_size": 64, "bits": 8}
    return None
