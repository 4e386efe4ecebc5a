"""Expert records <-> arrays: packing at conversion time, unpacking into MLX at run time."""

from __future__ import annotations

import weakref
from typing import Dict, Optional

import mlx.core as mx
import numpy as np

from ..kernels.reference import ExpertWeights, Projection
from . import placement
from .format import ExpertLayout

PROJECTIONS = ("gate", "up", "down")


MX_DTYPES = {"uint32": mx.uint32, "float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


_DTYPE_NAMES = {dtype: name for name, dtype in MX_DTYPES.items()}


def mx_dtype_name(a: mx.array) -> str:
    return _DTYPE_NAMES[a.dtype]


def to_numpy_bits(a: mx.array) -> np.ndarray:
    """An MLX array as numpy, bfloat16 carried as its raw uint16 bits."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.asarray(a)


def pack_record(tensors: Dict[str, mx.array], layout: ExpertLayout) -> bytes:
    """Serialise one expert's tensors into a zero-padded record of ``layout.record_size`` bytes."""
    buf = bytearray(layout.record_size)
    for slot in layout.tensors:
        a = to_numpy_bits(tensors[slot.name])
        if list(a.shape) != slot.shape:
            raise ValueError(f"{slot.name}: shape {list(a.shape)}, layout expects {slot.shape}")
        raw = np.ascontiguousarray(a).tobytes()
        buf[slot.offset: slot.offset + len(raw)] = raw
    return bytes(buf)


class RecordArrays:
    """Room for ``rows`` expert records as MLX arrays, one per tensor, that the reader fills
    in place through numpy views of the same memory (``ExpertReader.read(..., into=views)``).

    The records go from the file straight into the arrays the kernels read: no staging buffer
    and no copy inside MLX. Writing is only safe while no pending MLX computation reads the
    rows being written; the MoE layer guarantees it (its host sync on the router's choice
    comes after the previous layer's experts have been computed).

    ``on_host``: on MLX CUDA, keep the memory in host RAM and let the GPU read it over the bus
    (for records read once per use; see ``placement``). Elsewhere it changes nothing.
    """

    def __init__(self, layout: ExpertLayout, rows: int, on_host: bool = False):
        self.layout, self.rows = layout, rows
        raw = [mx.zeros((rows, slot.nbytes), dtype=mx.uint8) for slot in layout.tensors]
        typed = [r.view(MX_DTYPES[slot.dtype]).reshape(rows, *slot.shape) for r, slot in zip(raw, layout.tensors)]
        mx.eval(raw, typed)
        self.views = [np.array(r, copy=False) for r in raw]  # writable, aliasing the MLX memory
        if any(not v.flags.writeable for v in self.views):
            raise RuntimeError("this MLX build gives read-only views of its arrays")
        self._raw, self._typed = raw, dict(zip((s.name for s in layout.tensors), typed))
        self.on_host = on_host and placement.keep_on_host(self.views)
        if self.on_host:
            weakref.finalize(self, placement.release, self.views)

    def weights(self, n: Optional[int] = None) -> ExpertWeights:
        """The first ``n`` rows (default: all) as stacked expert weights."""
        def field(name: str) -> mx.array:
            a = self._typed[name]
            return a if n is None or n == self.rows else a[:n]

        projections = []
        for p in PROJECTIONS:
            if self.layout.bits < 16:
                projections.append(Projection(field(f"{p}.weight"), field(f"{p}.scales"), field(f"{p}.biases")))
            else:
                projections.append(Projection(field(f"{p}.weight")))
        return ExpertWeights(*projections, bits=self.layout.bits, group_size=self.layout.group_size)
