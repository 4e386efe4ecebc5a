"""``load()``: a packed model directory (or hub id) -> a streaming model and its tokenizer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .errors import ModelFormatError
from .experts import DiskExperts, ResidentExperts
from .io.format import load_manifest
from .io.reader import ExpertReader
from .models import architecture

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper


def _resolve(path: str | os.PathLike) -> Path:
    local = Path(path).expanduser()
    if local.exists() or str(path).count("/") != 1 or str(path).startswith((".", "/", "~")):
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path)))
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        raise ModelFormatError(f"{path}: not a local directory, and the hub download failed "
                               f"({type(exc).__name__}: {exc}).") from exc


def _quantize_resident(model: nn.Module, weights: dict, quantization: dict) -> None:
    """Swap Linear/Embedding layers for quantized ones where the saved weights are quantized."""

    def predicate(path: str, module: nn.Module):
        if f"{path}.scales" not in weights:
            return False
        override = quantization.get(path)
        return override if isinstance(override, dict) else True

    nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                mode=quantization.get("mode", "affine"), class_predicate=predicate)


def _dequantize_single_group_layers(model: nn.Module) -> None:
    """Keep quantized layers whose input fits in one quantization group in floating point.

    MLX CUDA 0.32 on Hopper sends such products with more than one row (a prompt) to a kernel
    that returns wrong values (measured on an H100: errors up to 3e38 at K=64 in float32, while
    one row is exact). Only toy models have layers this small, so the cost is nil.
    """
    replace = []
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and module.scales.shape[-1] == 1:
            w = mx.dequantize(module.weight, module.scales, module.biases, module.group_size, module.bits,
                              mode=module.mode)
            if isinstance(module, nn.QuantizedEmbedding):
                dense = nn.Embedding(*w.shape)
            else:
                dense = nn.Linear(w.shape[1], w.shape[0], bias="bias" in module)
                if "bias" in module:
                    dense.bias = module.bias
            dense.weight = w
            replace.append((path, dense))
    if replace:
        model.update_modules(tree_unflatten(replace))


def _cuda_build() -> bool:
    cuda = getattr(mx, "cuda", None)
    return cuda is not None and cuda.is_available()


def load(path: str | os.PathLike, experts_per_token: Optional[int] = None, *, threads: int = 8,
         cache_bytes: int = 0, check: str = "first", direct: bool = False, resident_experts: bool = False,
         max_read_bytes: int = 256 << 20, tokenizer_config: Optional[dict] = None) -> Tuple[nn.Module, "TokenizerWrapper"]:
    """Load a packed model whose experts stream from disk.

    Args:
        path: a directory written by ``flash_moe.convert`` (or a hub id holding one).
        experts_per_token: route each token to this many experts instead of the config's
            ``num_experts_per_tok`` (fewer bytes read per token; can be raised back later with
            ``model.set_experts_per_token``).
        threads: parallel reads in flight.
        cache_bytes: bytes of an LRU cache of expert records: slots in MLX arrays on the compute
            device (GPU memory on CUDA, RAM on CPU and Apple silicon), allocated here at load
            and indexed by the kernels directly; 0 relies on the page cache.
        check: verify each record's CRC-32 "first" time it is read (default), "always", or "never".
        direct: bypass the OS page cache (O_DIRECT / F_NOCACHE).
        resident_experts: read every expert into memory at load instead of streaming.
        max_read_bytes: most expert bytes a layer reads at once. A prompt that needs more
            experts of a layer computes them in groups of this size, each still read once,
            so prompt memory stays bounded (decode reads k records, far less).
    Returns ``(model, tokenizer)``; the tokenizer is mlx-lm's ``TokenizerWrapper``.
    """
    from mlx_lm.utils import load_tokenizer

    model_dir = _resolve(path)
    manifest = load_manifest(model_dir)
    arch = architecture(manifest.config, str(model_dir / "manifest.json"))
    args = arch.ModelArgs.from_dict(manifest.config)
    model = arch.Model(args)

    weights = {}
    for name in manifest.resident_files:
        try:
            weights.update(mx.load(str(model_dir / name)))
        except Exception as exc:
            raise ModelFormatError(f"{model_dir / name}: cannot read resident weights ({exc}). "
                                   "Re-run `flash-moe convert`.") from exc
    if manifest.resident_quantization:
        _quantize_resident(model, weights, manifest.resident_quantization)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        raise ModelFormatError(f"{model_dir}: resident weights do not match the model ({exc}). "
                               "Re-run `flash-moe convert` with this version of flash-moe.") from exc
    if manifest.resident_quantization and _cuda_build():
        _dequantize_single_group_layers(model)
    mx.eval(model.parameters())

    reader = ExpertReader(model_dir, manifest, threads=threads, check=check, direct=direct)
    model.expert_reader = reader
    model.attach_experts(ResidentExperts(reader) if resident_experts else DiskExperts(reader, cache_bytes))
    for block in model.moe_blocks():
        block.max_fetch = max(1, max_read_bytes // manifest.layout.record_size) \
            if max_read_bytes and not resident_experts else 0
    if experts_per_token is not None:
        model.set_experts_per_token(experts_per_token)

    eos = manifest.config.get("eos_token_id")
    tokenizer = load_tokenizer(model_dir, tokenizer_config or {},
                               eos_token_ids=[eos] if isinstance(eos, int) else eos)
    return model, tokenizer
