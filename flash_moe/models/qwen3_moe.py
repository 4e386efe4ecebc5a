"""Qwen3-MoE (``model_type`` "qwen3_moe") streaming its experts: mlx-lm's own model with each
sparse MoE block swapped for ``StreamingMoE``.

Attention, norms, embeddings and the cache are mlx-lm's code unchanged, so parity with the
resident mlx-lm model only depends on the MoE block; its router (softmax, top-k,
renormalised when ``norm_topk_prob``) is the one ``StreamingMoE.route`` implements.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Optional

import mlx.core as mx
from mlx_lm.models import qwen3_moe as _mlx

from .moe import StreamingModel, StreamingMoE

ModelArgs = _mlx.ModelArgs
EXPERT_PATTERN = re.compile(r"^model\.layers\.(\d+)\.mlp\.(experts|switch_mlp)\.(.+)$")


class Model(StreamingModel, _mlx.Model):
    """mlx-lm's Qwen3-MoE with streaming MoE blocks (dense ``mlp_only_layers`` stay resident)."""

    def __init__(self, args: ModelArgs):
        _mlx.Model.__init__(self, args)
        for i, layer in enumerate(self.model.layers):
            if isinstance(layer.mlp, _mlx.Qwen3MoeSparseMoeBlock):
                layer.mlp = StreamingMoE(i, args.hidden_size, args.num_experts, args.num_experts_per_tok,
                                         norm_topk_prob=args.norm_topk_prob)

    def forward(self, inputs: mx.array, cache: Optional[list] = None,
                input_embeddings: Optional[mx.array] = None) -> mx.array:
        return _mlx.Model.__call__(self, inputs, cache, input_embeddings)

    def make_cache(self, max_kv_size: Optional[int] = None) -> list:
        """A KV cache per layer (a window of ``max_kv_size`` tokens when given)."""
        return [self.attention_cache(max_kv_size) for _ in self.layers]

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        return weights  # the converter already wrote our names


def text_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """Qwen3-MoE configs are flat."""
    return dict(config)


def rename(name: str) -> Optional[str]:
    """Checkpoint names are already ours (``model.*``, ``lm_head.*``); other tensors are dropped."""
    return name if name.startswith(("model.", "lm_head.")) else None


def sanitize(name: str, value: mx.array, hf_layout: bool) -> mx.array:
    return value  # no norm offsets or conv layouts in this family


def quant_predicate(name: str) -> Optional[Dict[str, int]]:
    """The routers at 8 bits, as mlx-lm quantizes them."""
    if name.endswith("mlp.gate"):
        return {"group_size": 64, "bits": 8}
    return None
