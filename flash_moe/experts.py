"""Expert sources: the bridge from records on disk to the weights a MoE layer multiplies."""

from __future__ import annotations

from typing import Dict

import mlx.core as mx
import numpy as np

from .io.format import ExpertLayout
from .io.reader import ExpertReader
from .io.records import records_to_weights
from .kernels.reference import ExpertWeights


class DiskExperts:
    """Reads exactly the experts asked for, every time (the OS page cache or the reader's
    RAM cache may serve them)."""

    indexes_all = False

    def __init__(self, reader: ExpertReader):
        self.reader = reader
        self.layout: ExpertLayout = reader.manifest.layout

    def fetch(self, layer: int, experts: np.ndarray) -> ExpertWeights:
        return records_to_weights(self.reader.read(layer, experts), self.layout)


class ResidentExperts:
    """Every expert of every layer read once into memory, indexed by global expert id.

    The reference the streaming path is tested against, and the mode for models that fit.
    """

    indexes_all = True

    def __init__(self, reader: ExpertReader):
        n = reader.manifest.num_experts
        self._weights: Dict[int, ExpertWeights] = {}
        for layer in reader.manifest.moe_layers:
            w = records_to_weights(reader.read(layer, range(n)), reader.manifest.layout)
            mx.eval([p.weight for p in (w.gate, w.up, w.down)], [p.scales for p in (w.gate, w.up, w.down)
                                                                    if p.scales is not None])
            self._weights[layer] = w

    def fetch(self, layer: int, experts: np.ndarray) -> ExpertWeights:
        return self._weights[layer]

