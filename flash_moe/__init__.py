"""flash-moe: run Mixture-of-Experts language models larger than memory by streaming
their experts from disk, token by token, on MLX."""

from .conversion import convert
from .errors import ConversionError, CorruptRecordError, FlashMoeError, ModelFormatError, UnsupportedModelError
from .generation import GenerationResponse, generate, stream_generate
from .loader import load
from .verification import verify

__version__ = "0.1.0"
__all__ = ["ConversionError", "CorruptRecordError", "FlashMoeError", "GenerationResponse", "ModelFormatError",
           "UnsupportedModelError", "convert", "generate", "load", "stream_generate", "verify"]
