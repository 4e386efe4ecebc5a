"""GPU kernels for the hot loop, with the plain-MLX reference path (placeholder dispatch)."""

from .reference import ExpertWeights, Projection, expert_mlp, gated_delta_step, moe_combine

__all__ = ["ExpertWeights", "Projection", "expert_mlp", "gated_delta_step", "moe_combine"]
