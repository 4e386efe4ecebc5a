"""Model architectures that stream their experts, by Hugging Face ``model_type``."""

from __future__ import annotations

from types import ModuleType
from typing import Any, Dict

from ..errors import UnsupportedModelError
from . import qwen3_5_moe, qwen3_moe

ARCHITECTURES: Dict[str, ModuleType] = {"qwen3_5_moe": qwen3_5_moe, "qwen3_moe": qwen3_moe}


def architecture(config: Dict[str, Any], where: str = "config.json") -> ModuleType:
    """The module implementing ``config['model_type']``, or a clear error."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{where}: model_type {model_type!r} is not supported; flash-moe runs "
            f"{', '.join(sorted(ARCHITECTURES))}.")
    return ARCHITECTURES[model_type]
