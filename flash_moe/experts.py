"""Expert sources: the bridge from records on disk to the weights a MoE layer multiplies."""

from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional, Tuple

import mlx.core as mx
import numpy as np

from .io import placement
from .io.format import ExpertLayout
from .io.reader import ExpertReader, PendingRead
from .io.records import RecordArrays
from .kernels.reference import ExpertWeights


class DiskExperts:
    """Reads exactly the experts asked for, every time, unless the expert cache holds them.

    Records are read straight into the MLX arrays the kernels use (``RecordArrays``). The
    cache (``cache_bytes`` > 0) is a fixed set of slots in such arrays, least recently used
    out first: a hit costs nothing (no read, no copy: the kernels index the slot), and on a
    discrete GPU the slot stays in device memory, which the OS page cache cannot offer. On
    the CPU or a Mac's unified memory it is an in-RAM cache that skips the read. Without a
    cache, records are read into host memory that a discrete GPU reads over the bus, once.
    """

    def __init__(self, reader: ExpertReader, cache_bytes: int = 0):
        self.reader = reader
        self.layout: ExpertLayout = reader.manifest.layout
        self.slots = cache_bytes // self.layout.record_size
        # Two sets of read destinations used in turn (a layer's records stay intact while the
        # next layer's are read); grown to the largest request.
        self._ring: List[Optional[RecordArrays]] = [None, None]
        self._in_use: List[Optional[mx.array]] = [None, None]  # what last computed from each set
        self._turn = 0
        self._last: Optional[int] = None  # the set the last fetch read into (None: the cache)
        self._cache = RecordArrays(self.layout, self.slots) if self.slots else None
        self._slot_of: "OrderedDict[tuple, int]" = OrderedDict()  # (layer, expert) -> slot, LRU first
        self._free = list(range(self.slots))
        # The same map per layer as an array (expert -> slot, -1 when absent), for lookups on the
        # device: once a decode step found every expert in the cache, the next one looks its
        # slots up there, without the per-layer host sync, and the model checks afterwards
        # (``StreamingModel.__call__``). ``speculative_lookups = False`` turns that off.
        self.speculative_lookups = self.slots > 0
        self.speculating = False  # set by the model after a decode step that read nothing
        self.speculative_steps = 0  # decode steps that ran without the per-layer host sync
        self.speculation_failures = 0  # ... and those undone for a miss
        self._num_experts = reader.manifest.num_experts
        self._tables: dict = {}  # layer -> np.int32 [num_experts]
        self._tables_mx: dict = {}  # layer -> its MLX copy, made when first needed after a change

    def fetch(self, layer: int, experts: np.ndarray) -> Tuple[ExpertWeights, np.ndarray]:
        """Weights holding ``experts`` of MoE layer ``layer``, and the row of each in them."""
        weights, rows, pending = self.fetch_streamed(layer, experts)
        if pending is not None:
            pending.finish()
        return weights, rows

    def fetch_streamed(self, layer: int, experts: np.ndarray
                       ) -> Tuple[ExpertWeights, np.ndarray, Optional[PendingRead]]:
        """As ``fetch``, but returns while the records are still being read:
        ``pending.wait(positions)`` before computing with those experts, ``pending.finish()``
        at the end. ``pending`` is None when the cache served them."""
        experts = np.asarray(experts, dtype=np.int64)
        if self._cache is not None and len(experts) <= self.slots:
            self._last = None
            return (*self._fetch_cached(layer, experts), None)
        i, self._turn = self._turn, self._turn ^ 1
        self._last = i
        if self._in_use[i] is not None:  # a computation still reading this set must end first
            mx.eval(self._in_use[i])
            self._in_use[i] = None
        if self._ring[i] is None or self._ring[i].rows < len(experts):
            self._ring[i] = None  # free the old arrays before allocating the larger ones
            self._ring[i] = RecordArrays(self.layout, len(experts), on_host=True)
        dest = self._ring[i]
        pending = self.reader.submit(layer, experts, dest.views)
        return dest.weights(len(experts)), np.arange(len(experts)), pending

    def in_use(self, out: mx.array) -> None:
        """``out`` computes from the records of the last fetch: their set is not rewritten
        before it is evaluated."""
        if self._last is not None:
            self._in_use[self._last] = out

    def _fetch_cached(self, layer: int, experts: np.ndarray) -> Tuple[ExpertWeights, np.ndarray]:
        keys = [(layer, int(e)) for e in experts]
        rows = np.empty(len(keys), dtype=np.int64)
        missing = []
        for j, key in enumerate(keys):
            slot = self._slot_of.get(key)
            if slot is None:
                missing.append(j)
            else:
                rows[j] = slot
                self._slot_of.move_to_end(key)
        for j in missing:  # this call's hits were just moved to the end: they are not evicted
            if self._free:
                rows[j] = self._free.pop()
            else:
                old, rows[j] = self._slot_of.popitem(last=False)
                self._set_slot(old, -1)
            self._slot_of[keys[j]] = rows[j]
            self._set_slot(keys[j], rows[j])
        if missing:
            try:
                self.reader.read(layer, experts[missing], into=self._cache.views, rows=rows[missing])
            except BaseException:
                for j in missing:  # those slots hold partial records: forget them
                    del self._slot_of[keys[j]]
                    self._set_slot(keys[j], -1)
                    self._free.append(int(rows[j]))
                raise
            placement.move_to_device(self._cache.views, rows[missing])  # hits then read device memory
        self.reader.stats.cache_hits += len(keys) - len(missing)
        return self._cache.weights(), rows

    def _table(self, layer: int) -> np.ndarray:
        if layer not in self._tables:
            self._tables[layer] = np.full(self._num_experts, -1, dtype=np.int32)
        return self._tables[layer]

    def _set_slot(self, key: tuple, slot: int) -> None:
        layer, expert = key
        self._table(layer)[expert] = slot
        self._tables_mx.pop(layer, None)

    def slot_table(self, layer: int) -> mx.array:
        """int32 [num_experts]: the cache slot of each expert of ``layer``, -1 where absent."""
        if layer not in self._tables_mx:
            self._tables_mx[layer] = mx.array(self._table(layer))
        return self._tables_mx[layer]

    def cache_weights(self) -> ExpertWeights:
        """Every slot of the expert cache, as the weights the kernels index."""
        return self._cache.weights()

    def confirm(self, lookups: List[Tuple[int, np.ndarray]]) -> None:
        """A speculative step found all its experts ((layer, experts) pairs): count the hits and
        refresh their place in the LRU order, as a synchronous lookup would have."""
        for layer, experts in lookups:
            experts = np.unique(experts)
            for e in experts:
                self._slot_of.move_to_end((layer, int(e)))
            self.reader.stats.cache_hits += len(experts)

    def prefetch(self, layer: int, experts: np.ndarray) -> None:
        """Start reading records that will probably be fetched soon (see ``ExpertReader.prefetch``)."""
        self.reader.prefetch(layer, [e for e in experts if (layer, int(e)) not in self._slot_of])


class ResidentExperts:
    """Every expert of every layer read once into memory, indexed by global expert id.

    The reference the streaming path is tested against, and the mode for models that fit.
    The MoE layer needs no host sync with it (``holds_all``): nothing is read per token.
    """

    holds_all = True

    def __init__(self, reader: ExpertReader):
        n = reader.manifest.num_experts
        self._weights = {}
        for layer in reader.manifest.moe_layers:
            arrays = RecordArrays(reader.manifest.layout, n)
            reader.read(layer, range(n), into=arrays.views)
            self._weights[layer] = arrays.weights()

    def fetch(self, layer: int, experts: Optional[np.ndarray]) -> Tuple[ExpertWeights, None]:
        return self._weights[layer], None  # rows are the expert ids themselves
