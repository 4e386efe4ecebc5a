"""Expert sources: the bridge from records on disk to the weights a MoE layer multiplies."""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List

import mlx.core as mx
import numpy as np

from .io.format import ExpertLayout
from .io.reader import ExpertReader
from .io.records import records_to_weights
from .kernels.reference import ExpertWeights


class DiskExperts:
    """Reads exactly the experts asked for, every time, unless the expert cache holds them.

    The cache (``cache_bytes`` > 0) keeps records as MLX arrays on the compute device, least
    recently used out first: on a discrete GPU a hit skips both the disk and the host-to-device
    copy (the OS page cache can only save the first); on the CPU or a Mac's unified memory it
    is an in-RAM cache that skips the read.
    """

    indexes_all = False

    def __init__(self, reader: ExpertReader, cache_bytes: int = 0):
        self.reader = reader
        self.layout: ExpertLayout = reader.manifest.layout
        self.cache_bytes = cache_bytes
        self._cache: "OrderedDict[tuple, mx.array]" = OrderedDict()

    def fetch(self, layer: int, experts: np.ndarray) -> ExpertWeights:
        if self.cache_bytes < self.layout.record_size:
            return records_to_weights(self.reader.read(layer, experts), self.layout)
        keys = [(layer, int(e)) for e in experts]
        rows: List = [self._cache.get(k) for k in keys]
        missing = [i for i, row in enumerate(rows) if row is None]
        if missing:
            fresh = mx.array(self.reader.read(layer, [keys[i][1] for i in missing]))  # one host->device copy
            copies = []
            for j, i in enumerate(missing):
                rows[i] = fresh[j]
                copies.append(fresh[j] * 1)
                self._remember(keys[i], copies[-1])
            mx.async_eval(copies)  # evaluated now, so nothing lazy keeps the batch alive
        for k in keys:  # mark as recently used (a fresh key may already have been evicted)
            if k in self._cache:
                self._cache.move_to_end(k)
        self.reader.stats.cache_hits += len(keys) - len(missing)
        return records_to_weights(mx.stack(rows), self.layout)

    def _remember(self, key: tuple, record: mx.array) -> None:
        # ``record`` must own its buffer (the caller passes a copy): a row view would keep the
        # whole read batch alive, and the cache would hold far more than ``cache_bytes``.
        while self._cache and (len(self._cache) + 1) * self.layout.record_size > self.cache_bytes:
            self._cache.popitem(last=False)
        self._cache[key] = record

    def prefetch(self, layer: int, experts: np.ndarray) -> None:
        """Start reading records that will probably be fetched soon (see ``ExpertReader.prefetch``)."""
        self.reader.prefetch(layer, [e for e in experts if (layer, int(e)) not in self._cache])


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

