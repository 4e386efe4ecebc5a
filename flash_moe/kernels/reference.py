"""Plain-MLX reference path for the hot-loop operations.

These are the definitions every custom kernel is tested against, and the path the
library takes on the CPU. They only use MLX ops (`mx.gather_qmm`, `mx.gather_mm`,
`mx.fast.gated_delta_update`), so they run on every backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn


@dataclass
class Projection:
    """One stacked projection of U experts, as stored in a record.

    Quantized (bits in {2, 4, 8}): ``weight`` is uint32 [U, out, in * bits / 32] in MLX's
    packing, ``scales`` and ``biases`` are [U, out, in / group_size] (affine mode).
    Unquantized (bits == 16): ``weight`` is a float array [U, out, in]; scales/biases are None.
    """

    weight: mx.array
    scales: Optional[mx.array] = None
    biases: Optional[mx.array] = None


@dataclass
class ExpertWeights:
    """The SwiGLU weights of U experts, in the order the caller's indices refer to."""

    gate: Projection
    up: Projection
    down: Projection
    bits: int
    group_size: int

    @property
    def quantized(self) -> bool:
        return self.bits < 16


def _project(x: mx.array, p: Projection, idx: mx.array, bits: int, group_size: int, sorted_indices: bool) -> mx.array:
    if bits >= 16:
        return mx.gather_mm(x, p.weight.swapaxes(-1, -2), rhs_indices=idx, sorted_indices=sorted_indices)
    return mx.gather_qmm(
        x,
        p.weight,
        p.scales,
        p.biases,
        rhs_indices=idx,
        transpose=True,
        group_size=group_size,
        bits=bits,
        sorted_indices=sorted_indices,
    )


def expert_mlp(x: mx.array, w: ExpertWeights, inds: mx.array, scores: mx.array) -> mx.array:
    """Weighted sum of the chosen experts' SwiGLU outputs.

    x: [N, H]; inds: [N, k] int32 indices into the U experts of ``w``;
    scores: [N, k] routing weights. Returns [N, H] in x's dtype:
    sum_j scores[n, j] * down_j(silu(gate_j(x_n)) * up_j(x_n)).
    """
    N, k = inds.shape
    xe = mx.expand_dims(x, (-2, -3))  # [N, 1, 1, H]
    idx = inds
    do_sort = inds.size >= 64
    inv_order = None
    if do_sort:
        flat = inds.flatten()
        order = mx.argsort(flat)
        inv_order = mx.argsort(order)
        xe = xe.flatten(0, -3)[order // k]
        idx = flat[order]
    g = _project(xe, w.gate, idx, w.bits, w.group_size, do_sort)
    u = _project(xe, w.up, idx, w.bits, w.group_size, do_sort)
    h = nn.silu(g) * u
    y = _project(h, w.down, idx, w.bits, w.group_size, do_sort)
    if do_sort:
        y = mx.unflatten(y[inv_order], 0, (N, k))
    y = y.squeeze(-2)  # [N, k, H]
    return (y * scores[..., None]).sum(axis=-2).astype(x.dtype)


def moe_combine(expert_out: mx.array, shared_out: mx.array, shared_gate: mx.array, residual: mx.array) -> mx.array:
    """residual + expert_out + sigmoid(shared_gate) * shared_out; shared_gate is [..., 1] logits."""
    return residual + (expert_out + mx.sigmoid(shared_gate) * shared_out)


def gated_delta_step(
    q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array
) -> Tuple[mx.array, mx.array]:
    """One decode step of the gated delta rule for all heads.

    q, k: [B, Hk, Dk] (q already scaled, both L2-normalised); v: [B, Hv, Dv];
    g: [B, Hv] decay in linear space; beta: [B, Hv]; state: [B, Hv, Dv, Dk] float32.
    Returns y [B, Hv, Dv] (q's dtype) and the new state:
        S <- g * S;  S <- S + k (beta * (v - S k))^T;  y = S q
    """
    Hk, Hv = k.shape[1], v.shape[1]
    if Hv > Hk:
        q = mx.repeat(q, Hv // Hk, axis=1)
        k = mx.repeat(k, Hv // Hk, axis=1)
    state = state * g[..., None, None]
    kv_mem = (state * k[..., None, :]).sum(axis=-1)
    delta = (v - kv_mem) * beta[..., None]
    state = state + k[..., None, :] * delta[..., None]
    y = (state * q[..., None, :]).sum(axis=-1)
    return y.astype(q.dtype), state


def random_gated_delta_inputs(B: int, HK: int, HV: int, DK: int, DV: int, dtype=mx.float32, seed: Optional[int] = None):
    """Random (q, k, v, g, beta, state) for one decode step, scaled as the model scales them
    (unit-norm q and k, q times DK**-0.5, decay g in [0.3, 1)); for tests and benchmarks."""
    if seed is not None:
        mx.random.seed(seed)
    q = mx.random.normal((B, HK, DK))
    k = mx.random.normal((B, HK, DK))
    q = (q / mx.linalg.norm(q, axis=-1, keepdims=True) * DK ** -0.5).astype(dtype)
    k = (k / mx.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
    v = mx.random.normal((B, HV, DV)).astype(dtype)
    g = mx.random.uniform(0.3, 1.0, (B, HV)).astype(dtype)
    beta = mx.random.uniform(0.0, 1.0, (B, HV)).astype(dtype)
    state = mx.random.normal((B, HV, DV, DK))
    return q, k, v, g, beta, state
