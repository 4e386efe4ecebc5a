"""Compiled one-token steps.

A decode step's host time is mostly per-operation work: Python building each op, then MLX
preparing each launch (measured on the H100: ~4.5 ms of host time per token on a 6-layer model
whose GPU work takes ~1.6 ms). The parts of a layer that are pure functions of their inputs (the
DeltaNet mixer given its cache arrays, the MoE block given resident or cached experts) are traced
once with ``mx.compile`` and replayed: one Python call per part, elementwise chains fused.

``FLASH_MOE_COMPILE=0`` (or ``set_enabled(False)``) runs every step op by op.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, Hashable, Optional

import mlx.core as mx

from .. import kernels

_forced: Optional[bool] = None


def set_enabled(on: Optional[bool]) -> None:
    """Turn compiled steps on or off (None: back to ``FLASH_MOE_COMPILE``, default on)."""
    global _forced
    _forced = on


def enabled() -> bool:
    if _forced is not None:
        return _forced
    return os.environ.get("FLASH_MOE_COMPILE", "1") != "0"


def step(owner: object, key: Hashable, make: Callable[[], Callable], inputs=None) -> Callable:
    """``owner``'s compiled function for ``key``, made by ``make()`` on first use.

    The key always includes the device and the kernel path: a trace bakes in which kernels
    (and which launch shapes) run, so switching either traces again.
    """
    table: Dict[Hashable, Callable] = owner.__dict__.setdefault("_compiled_steps", {})
    full = (key, str(mx.default_device()), kernels.trace_key())
    fn = table.get(full)
    if fn is None:
        fn = table[full] = _first_trace(table, full, make, inputs)
    return fn


def _first_trace(table: dict, full: Hashable, make: Callable[[], Callable], inputs) -> Callable:
    """The first call traces; should tracing fail (a backend that cannot compile one of the
    operations), the step runs op by op from then on, with a warning, instead of failing."""
    traced = mx.compile(make(), inputs=inputs)

    def first(*args):
        try:
            out = traced(*args)
        except Exception as exc:  # noqa: BLE001 - any tracing failure falls back the same way
            warnings.warn(f"flash-moe: compiling the step {full[0]!r} failed ({type(exc).__name__}: {exc}); "
                          "it runs op by op", RuntimeWarning, stacklevel=3)
            table[full] = make()
            return table[full](*args)
        table[full] = traced  # later calls go straight to the trace
        return out
    return first
