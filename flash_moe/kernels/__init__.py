"""Hot-loop operations of the MoE layer, dispatched to the fastest path of the backend.

* Metal GPU (``mx.metal.is_available()`` and the default device is the GPU): custom
  ``mx.fast.metal_kernel`` kernels;
* MLX CUDA GPU (``mx.cuda.is_available()`` and the default device is the GPU): the same
  kernels built with ``mx.fast.cuda_kernel``;
* otherwise (CPU), or when forced: the plain-MLX reference in ``reference.py``.

Both GPU builds come from one algorithm text per kernel (``sources.py``, ``codegen.py``).
Inputs a kernel does not cover (unquantized experts, unusual shapes or dtypes, large
token counts) silently take the reference path. Force the reference everywhere with the
environment variable ``FLASH_MOE_KERNELS=reference`` or ``set_backend("reference")``.
``FLASH_MOE_PROJECTION`` = 1, 2, 4 or 5 forces one version of the expert-projection kernels
(default: the prefetching v2 for every token count; 4 and 5 are the split-K variants; see
``benchmarks/KERNELS_NOTES.md``).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Tuple

import mlx.core as mx

from . import launch, reference
from .reference import ExpertWeights, Projection

__all__ = [
    "ExpertWeights",
    "Projection",
    "active_backend",
    "backend",
    "expert_mlp",
    "expert_mlp_combine",
    "gated_delta_step",
    "moe_combine",
    "set_backend",
    "trace_key",
]

_forced: Optional[str] = None  # set by set_backend; None defers to the environment


def set_backend(mode: str) -> None:
    """``"reference"`` forces the plain-MLX path; ``"auto"`` picks by device (the default).

    Overrides the ``FLASH_MOE_KERNELS`` environment variable while set.
    """
    global _forced
    if mode not in ("reference", "auto"):
        raise ValueError(f"backend mode must be 'reference' or 'auto', not {mode!r}")
    _forced = mode


@contextlib.contextmanager
def backend(mode: str) -> Iterator[None]:
    """``with kernels.backend("reference"):`` runs the block on that path, then restores the
    previous setting (e.g. to compare the kernels with the reference)."""
    global _forced
    before = _forced
    set_backend(mode)
    try:
        yield
    finally:
        _forced = before


def gpu_target() -> Optional[str]:
    """``"metal"`` or ``"cuda"`` when MLX computes on that GPU by default, else None."""
    if mx.default_device().type != mx.DeviceType.gpu:
        return None
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return None


def active_backend() -> str:
    """``"metal"``, ``"cuda"`` or ``"reference"``: the path the next call will take."""
    mode = _forced or ("reference" if os.environ.get("FLASH_MOE_KERNELS", "auto") == "reference" else "auto")
    if mode == "reference":
        return "reference"
    return gpu_target() or "reference"


def trace_key() -> tuple:
    """What a traced (``mx.compile``) call of these operations bakes in: the path and the
    projection version. (Launch shapes changed later in ``launch.TUNING`` do not reach a trace.)"""
    return active_backend(), launch.default_version(1)


def _on_gpu(launch_fn, *args, **kwargs):
    """The custom kernel's result, or None where the reference path must run (CPU, forced
    reference, or inputs the kernel does not cover)."""
    target = active_backend()
    return None if target == "reference" else launch_fn(target, *args, **kwargs)


def _as(a: mx.array, dtype: Optional[mx.Dtype]) -> mx.array:
    return a if dtype is None or a.dtype == dtype else a.astype(dtype)


def expert_mlp(x: mx.array, w: ExpertWeights, inds: mx.array, scores: mx.array,
               out_dtype: Optional[mx.Dtype] = None) -> mx.array:
    """Weighted sum of the chosen experts' SwiGLU outputs (see ``reference.expert_mlp``).

    x: [N, H]; inds, scores: [N, k]. Returns [N, H] in ``out_dtype`` (default x's dtype; ask for
    float32 when the sum goes on into ``moe_combine``: a one-token GPU kernel sums in float32).
    """
    y = _on_gpu(launch.expert_mlp, x, w, inds, scores, out_dtype=out_dtype)
    return _as(reference.expert_mlp(x, w, inds, scores), out_dtype) if y is None else y


def moe_combine(expert_out: mx.array, shared_out: mx.array, shared_gate: mx.array, residual: mx.array,
                out_dtype: Optional[mx.Dtype] = None) -> mx.array:
    """residual + expert_out + sigmoid(shared_gate) * shared_out (see ``reference.moe_combine``),
    in ``out_dtype`` (default: the inputs' result type)."""
    out = _on_gpu(launch.moe_combine, expert_out, shared_out, shared_gate, residual, out_dtype)
    if out is None:
        out = _as(reference.moe_combine(expert_out, shared_out, shared_gate, residual), out_dtype)
    return out


def expert_mlp_combine(
    x: mx.array, w: ExpertWeights, inds: mx.array, scores: mx.array,
    shared_out: mx.array, shared_gate: mx.array, residual: mx.array,
) -> mx.array:
    """``moe_combine(expert_mlp(x, w, inds, scores), shared_out, shared_gate, residual)``.

    On a GPU the combine is fused into the down-projection kernel (one launch fewer).
    """
    y = _on_gpu(launch.expert_mlp, x, w, inds, scores, combine=(shared_out, shared_gate, residual))
    if y is None:  # the routed sum stays in float32 until the combine, as in the kernels
        y = moe_combine(expert_mlp(x, w, inds, scores, out_dtype=mx.float32), shared_out, shared_gate, residual,
                        out_dtype=mx.result_type(x.dtype, shared_out.dtype, shared_gate.dtype))
    return y


def gated_delta_step(
    q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array
) -> Tuple[mx.array, mx.array]:
    """One decode step of the gated delta rule (see ``reference.gated_delta_step``).

    q, k: [B, Hk, Dk]; v: [B, Hv, Dv]; g, beta: [B, Hv]; state: [B, Hv, Dv, Dk] float32.
    Returns (y [B, Hv, Dv] in q's dtype, new state).
    """
    out = _on_gpu(launch.gated_delta_step, q, k, v, g, beta, state)
    return reference.gated_delta_step(q, k, v, g, beta, state) if out is None else out
