"""Tensor-by-tensor access to a safetensors checkpoint, without loading whole files.

The safetensors header gives each tensor's dtype, shape and byte range, so one expert of a
fused [E, ...] tensor is a single ``pread`` of its slice: converting a checkpoint never needs
more memory than one tensor (or one expert's slice of it).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import mlx.core as mx
import numpy as np

from ..errors import ConversionError

# safetensors dtype -> (numpy dtype used to carry the bytes, MLX dtype after a bit cast)
_DTYPES = {
    "F32": (np.float32, mx.float32),
    "F16": (np.float16, mx.float16),
    "BF16": (np.uint16, mx.bfloat16),
    "U32": (np.uint32, mx.uint32),
    "I32": (np.int32, mx.int32),
    "I64": (np.int64, mx.int64),
    "U8": (np.uint8, mx.uint8),
    "I8": (np.int8, mx.int8),
    "BOOL": (np.bool_, mx.bool_),
}


@dataclass
class TensorRef:
    file: Path
    dtype: str
    shape: Tuple[int, ...]
    start: int  # absolute byte offset of the data in the file
    end: int


class CheckpointIndex:
    """Every tensor of the ``*.safetensors`` files in a directory, by name."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"{self.directory}: no *.safetensors files. Pass a Hugging Face or "
                                  "mlx-lm checkpoint directory (or hub id).")
        self.tensors: Dict[str, TensorRef] = {}
        for f in files:
            for name, ref in self._read_header(f).items():
                self.tensors[name] = ref

    @staticmethod
    def _read_header(path: Path) -> Dict[str, TensorRef]:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(f"{path}: truncated safetensors file ({size} bytes). Download it again.")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ConversionError(f"{path}: header length {n} exceeds the file size: truncated or not "
                                      "safetensors. Download it again.")
            try:
                header = json.loads(f.read(n))
            except ValueError as exc:
                raise ConversionError(f"{path}: unreadable safetensors header ({exc}).") from exc
        base, refs = 8 + n, {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            if base + end > size:
                raise ConversionError(f"{path}: tensor {name} ends at byte {base + end} but the file has "
                                      f"{size}: truncated. Download it again.")
            if info["dtype"] not in _DTYPES:
                raise ConversionError(f"{path}: tensor {name} has dtype {info['dtype']}, not supported.")
            refs[name] = TensorRef(path, info["dtype"], tuple(info["shape"]), base + start, base + end)
        return refs

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.tensors[name].shape

    def nbytes(self, name: str) -> int:
        ref = self.tensors[name]
        return ref.end - ref.start

    def read(self, name: str, index: Optional[int] = None) -> mx.array:
        """The tensor ``name``, or only ``tensor[index]`` along its first axis."""
        ref = self.tensors[name]
        np_dtype, mx_dtype = _DTYPES[ref.dtype]
        shape, start, nbytes = ref.shape, ref.start, ref.end - ref.start
        if index is not None:
            row = nbytes // shape[0]
            start, nbytes, shape = start + index * row, row, shape[1:]
        buf = bytearray(nbytes)
        with open(ref.file, "rb", buffering=0) as f:
            got = f.readinto(memoryview(buf)) if f.seek(start) == start else 0
        if got != nbytes:
            raise ConversionError(f"{ref.file}: short read of {name} ({got} of {nbytes} bytes). Download it again.")
        arr = mx.array(np.frombuffer(buf, dtype=np_dtype).reshape(shape))
        return arr.view(mx_dtype) if ref.dtype == "BF16" else arr
