"""Synthetic benchmark models: a random Qwen3.5-MoE with realistic expert records.

The model is built as an mlx-lm 4-bit checkpoint (so mlx-lm can load it resident, as the
ceiling) and then packed with ``flash_moe.convert`` (which copies mlx-lm's quantized experts
without re-quantizing), so both sides run exactly the same weights. Both are cached in a work
directory keyed by the shape, because building a multi-GB model takes a minute.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict

import mlx.core as mx


@dataclass(frozen=True)
class Shape:
    """The sizes that set a record's size and the model's size on disk."""

    hidden: int = 2048
    intermediate: int = 512
    experts: int = 128
    layers: int = 8
    top_k: int = 4
    dtype: str = "float32"  # float32 on CPU (MLX CPU is slow in half precision), bfloat16 on GPU
    bits: int = 4
    arch: str = "qwen3_5_moe"

    @property
    def key(self) -> str:
        return (f"{self.arch}-h{self.hidden}-i{self.intermediate}-e{self.experts}-l{self.layers}-k{self.top_k}-"
                f"{self.dtype}-q{self.bits}")


def text_config(shape: Shape) -> Dict[str, Any]:
    """A Qwen3.5-MoE text config: real expert sizes, cheap attention / DeltaNet (they are
    resident in both models and not what the benchmark measures)."""
    from flash_moe.tiny import tiny_config

    return tiny_config(hidden_size=shape.hidden, moe_intermediate_size=shape.intermediate,
                       shared_expert_intermediate_size=shape.intermediate, num_experts=shape.experts,
                       num_experts_per_tok=shape.top_k, num_hidden_layers=shape.layers,
                       num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                       linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64,
                       linear_value_head_dim=64, vocab_size=512,
                       # mlx-lm's model needs a full-attention layer: one in models under 4 layers too
                       full_attention_interval=min(4, shape.layers))


def qwen3_moe_config(shape: Shape) -> Dict[str, Any]:
    """A Qwen3-MoE (``qwen3_moe``) config with the same expert sizes."""
    return {"model_type": "qwen3_moe", "hidden_size": shape.hidden, "num_hidden_layers": shape.layers,
            "intermediate_size": shape.intermediate * 4, "num_attention_heads": 8, "num_key_value_heads": 2,
            "head_dim": 128, "rms_norm_eps": 1e-6, "vocab_size": 512, "max_position_embeddings": 4096,
            "rope_theta": 1000000.0, "tie_word_embeddings": False, "num_experts": shape.experts,
            "num_experts_per_tok": shape.top_k, "moe_intermediate_size": shape.intermediate,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "eos_token_id": 2,
            "attention_bias": False}


def build_mlx_lm_checkpoint(shape: Shape, path: Path, seed: int = 0) -> Path:
    """Random weights through mlx-lm's own model class, quantized and saved by mlx-lm.

    MLX is lazy: each shard's random init and quantization are evaluated only when
    ``save_model`` writes it, so peak memory stays near one shard, not the float model.
    """
    from mlx_lm.utils import _get_classes, quantize_model, save_config, save_model

    from flash_moe.tiny import write_tokenizer

    if shape.arch == "qwen3_5_moe":
        config = {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
                  "text_config": text_config(shape), "tie_word_embeddings": False}
    else:
        config = qwen3_moe_config(shape)
    mx.random.seed(seed)
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    model.set_dtype(getattr(mx, shape.dtype))
    if shape.arch == "qwen3_5_moe":
        # A peaked router, like a trained one: random init routes almost uniformly.
        for layer in model.language_model.model.layers:
            layer.mlp.gate.weight = layer.mlp.gate.weight * 8
    model, config = quantize_model(model, config, 64, shape.bits,
                                   quant_predicate=getattr(model, "quant_predicate", None))
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_tokenizer(tmp)
    save_model(tmp, model, donate_model=True)
    config["eos_token_id"] = 2
    save_config(config, tmp / "config.json")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def ensure_models(shape: Shape, workdir: Path, log=print) -> Dict[str, Path]:
    """The mlx-lm checkpoint and its packed conversion for ``shape``, built once and cached."""
    from flash_moe import convert

    root = Path(workdir) / shape.key
    mlx_dir, packed = root / "mlx-lm", root / "packed"
    if not (mlx_dir / "config.json").exists():
        log(f"building {mlx_dir} ...")
        build_mlx_lm_checkpoint(shape, mlx_dir)
    if not (packed / "manifest.json").exists():
        log(f"packing {packed} ...")
        convert(mlx_dir, packed, overwrite=True, progress=False)
    (root / "shape.json").write_text(json.dumps(asdict(shape)))
    return {"mlx_lm": mlx_dir, "packed": packed}
