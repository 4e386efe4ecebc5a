"""Shared fixtures: tiny random Qwen3.5-MoE checkpoints in the Hugging Face format, and their
packed conversions, built once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
# Full float32 matmuls on GPUs (MLX uses TF32 on CUDA by default): GPU-vs-CPU comparisons are exact
# enough to hold to 1e-3 end to end.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

from flash_moe import convert  # noqa: E402
from flash_moe.tiny import make_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """A float32 checkpoint: layers 0-2 DeltaNet, layer 3 attention, 8 experts, top-2."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="session")
def packed16(hf_checkpoint, tmp_path_factory):
    return convert(hf_checkpoint, tmp_path_factory.mktemp("packed") / "bits16", bits=16, progress=False)


@pytest.fixture(scope="session")
def packed4(hf_checkpoint, tmp_path_factory):
    return convert(hf_checkpoint, tmp_path_factory.mktemp("packed") / "bits4", bits=4, progress=False)
