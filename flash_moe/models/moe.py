"""The streaming sparse-MoE block: router -> host sync -> read k records -> expert SwiGLU -> combine.

It is model-agnostic: any architecture whose MoE is "softmax (or sigmoid) router, top-k,
SwiGLU experts, optional gated shared expert" builds it with its own sizes.
"""

from __future__ import annotations

from typing import Optional, Protocol, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache, RotatingKVCache

from .. import kernels
from ..kernels.reference import ExpertWeights, Projection
from . import compiled


class ExpertSource(Protocol):
    """Where a MoE layer's expert weights come from.

    Optional parts: ``holds_all = True`` (every expert in memory: the layer skips its host
    sync), ``fetch_streamed`` / ``in_use`` (records still landing: ``DiskExperts``) and
    ``prefetch`` (next-layer reads started early).
    """

    def fetch(self, layer: int, experts: np.ndarray) -> Tuple[ExpertWeights, Optional[np.ndarray]]:
        """Stacked weights that hold ``experts`` (sorted, unique) of MoE layer ``layer``, and
        the row of each of them in those weights (more rows may be there: a cache); a
        ``holds_all`` source returns None (every expert at its own index)."""
        ...


class SwiGLU(nn.Module):
    """A dense SwiGLU feed-forward (the shared expert, or a dense layer's MLP)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class StreamingMoE(nn.Module):
    """Sparse MoE whose routed experts are fetched from an ``ExpertSource`` per call.

    Only the router and the shared expert are parameters of the module; the routed experts
    are read for exactly the indices the router picks. All tokens of the call are routed at
    once, so a prompt chunk reads each distinct expert once per layer.
    """

    def __init__(self, layer: int, dim: int, num_experts: int, top_k: int, norm_topk_prob: bool = True,
                 shared_expert_dim: int = 0, shared_expert_gate: bool = True):
        super().__init__()
        self.layer = layer
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.gate = nn.Linear(dim, num_experts, bias=False)
        if shared_expert_dim:
            self.shared_expert = SwiGLU(dim, shared_expert_dim)
            if shared_expert_gate:
                self.shared_expert_gate = nn.Linear(dim, 1, bias=False)
        self._source: Optional[ExpertSource] = None  # set by the loader; not a parameter
        # Most records fetched at once (set by the loader from its byte budget): a long prompt
        # that needs more experts of a layer is computed in groups of experts, so that memory
        # holds one group's records, not every expert of the layer. 0: no limit.
        self.max_fetch = 0
        # Next-layer prefetch (off by default): this layer's MoE input through the next layer's
        # router predicts the next layer's experts; their reads start while this layer computes.
        self._next: Optional["StreamingMoE"] = None
        self._predicted: Optional[np.ndarray] = None
        self.prediction_counts = [0, 0]  # [predicted experts that were needed, experts needed]
        # A decode step's experts are computed in this many groups, each as soon as its records
        # have landed, while the rest are still read (sources that stream: DiskExperts), when the
        # step reads at least chunk_min_bytes: below that, each group's extra evaluation costs
        # more than the overlap gains (measured: -25% tok/s on the 123 KB records of the demo).
        self.read_chunks = 4
        self.chunk_min_bytes = 4 << 20
        self._lookups: Optional[_Lookups] = None  # set by the model during a speculative step

    def route(self, x: mx.array):
        """Top-k expert indices and their (renormalised) softmax weights."""
        probs = mx.softmax(self.gate(x), axis=-1, precise=True)
        k = self.top_k
        inds = mx.argpartition(probs, kth=-k, axis=-1)[..., -k:]
        scores = mx.take_along_axis(probs, inds, axis=-1)
        if self.norm_topk_prob:
            scores = scores / scores.sum(axis=-1, keepdims=True)
        return inds, scores

    def __call__(self, x: mx.array, residual: Optional[mx.array] = None) -> mx.array:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self._source is None:
            raise RuntimeError("no expert source attached: load models with flash_moe.load()")
        holds_all = getattr(self._source, "holds_all", False)
        if x2.shape[0] == 1 and (holds_all or self._lookups is not None) and compiled.enabled():
            return self._compiled_token(x2, residual, holds_all).reshape(shape)
        inds, scores = self.route(x2)
        # Only the disk path waits on the host mid-step (the router sync). There, work handed to
        # the device early runs during the wait; elsewhere an extra submission per layer only
        # costs (measured on the H100, resident experts: no gain, 0.1 ms more per token).
        syncs = not holds_all and self._lookups is None

        # The shared expert needs no routing: let the device start on it while the disk works.
        shared, shared_gate = None, None
        if hasattr(self, "shared_expert"):
            shared = self.shared_expert(x2)
            shared_gate = self.shared_expert_gate(x2) if hasattr(self, "shared_expert_gate") else None
            if syncs:
                mx.async_eval(shared)

        if holds_all:
            # Every expert in memory: nothing to read, so no host sync; the router's indices
            # go to the kernels as they are.
            y = kernels.expert_mlp(x2, self._source.fetch(self.layer, None)[0], inds, scores, out_dtype=mx.float32)
        elif self._lookups is not None:
            y = self._routed_from_slots(x2, inds, scores)
        else:
            y = self._routed_from_source(x2, inds, scores)

        out = self._combine(y, shared, shared_gate, None if residual is None else residual.reshape(y.shape),
                            x.dtype)
        if syncs:  # the device computes the experts while Python builds the next layer's graph
            mx.async_eval(out)
        return out.reshape(shape)

    @staticmethod
    def _combine(y: mx.array, shared: Optional[mx.array], shared_gate: Optional[mx.array],
                 res: Optional[mx.array], dtype: mx.Dtype) -> mx.array:
        """y (the routed sum, float32: the kernels write it so; the split-K ones accumulate in
        it) + the gated shared expert + the residual, cast back to the model's dtype in one pass."""
        if shared is not None and shared_gate is not None:
            return kernels.moe_combine(y, shared, shared_gate, mx.zeros_like(shared) if res is None else res,
                                       out_dtype=dtype)
        out = y if shared is None else y + shared
        return (out if res is None else res + out).astype(dtype)

    def _compiled_token(self, x2: mx.array, residual: Optional[mx.array], holds_all: bool) -> mx.array:
        """One token through the block as a single compiled call: router, shared expert, routed
        experts (resident, or looked up in the cache's slot table) and combine. Nothing in it
        waits on the host, so the whole block is one replayed trace."""
        if holds_all:
            weights = self._source.fetch(self.layer, None)[0]
            table = None
        else:
            weights = self._source.cache_weights()
            table = self._source.slot_table(self.layer)
        arrays = _weight_arrays(weights)
        args = [x2, arrays] + ([] if residual is None else [residual.reshape(x2.shape)]) + \
            ([] if table is None else [table])
        key = ("moe", self.top_k, weights.bits, weights.group_size, residual is not None, table is not None)
        fn = compiled.step(self, key, lambda: self._token_fn(weights.bits, weights.group_size,
                                                             residual is not None, table is not None),
                           inputs=self._resident_modules())
        out, inds, rows = fn(*args)
        if table is not None:
            self._lookups.entries.append((self.layer, inds, rows))
        return out

    def _resident_modules(self) -> list:
        return [getattr(self, name) for name in ("gate", "shared_expert", "shared_expert_gate") if hasattr(self, name)]

    def _token_fn(self, bits: int, group_size: int, has_residual: bool, looks_up: bool):
        def token(x2, arrays, *rest):
            res = rest[0] if has_residual else None
            inds, scores = self.route(x2)
            rows = rows_at = inds
            if looks_up:
                rows = rest[-1][inds]
                rows_at = mx.maximum(rows, 0)  # a miss (-1) computes garbage that the check discards
            weights = _weights_from(arrays, bits, group_size)
            shared = self.shared_expert(x2) if hasattr(self, "shared_expert") else None
            gate = self.shared_expert_gate(x2) if hasattr(self, "shared_expert_gate") else None
            if shared is not None and gate is not None and res is not None:  # combine fused into down
                out = kernels.expert_mlp_combine(x2, weights, rows_at, scores, shared, gate, res).astype(x2.dtype)
            else:
                y = kernels.expert_mlp(x2, weights, rows_at, scores, out_dtype=mx.float32)
                out = self._combine(y, shared, gate, res, x2.dtype)
            return out, inds, rows
        return token

    def _routed_from_slots(self, x2: mx.array, inds: mx.array, scores: mx.array) -> mx.array:
        """A speculative decode step: the experts' cache slots are looked up on the device, with
        no host sync; the model checks after the forward pass that each was there."""
        rows = self._source.slot_table(self.layer)[inds]
        self._lookups.entries.append((self.layer, inds, rows))
        return kernels.expert_mlp(x2, self._source.cache_weights(), mx.maximum(rows, 0), scores,
                                  out_dtype=mx.float32)

    def _routed_from_source(self, x2: mx.array, inds: mx.array, scores: mx.array) -> mx.array:
        """The routed experts' weighted sum, after the one host sync of the layer: which
        experts to read."""
        nxt = self._next
        if nxt is not None:  # the guess rides on the same sync (softmax keeps the order: skip it)
            guess = mx.argpartition(nxt.gate(x2), kth=-nxt.top_k, axis=-1)[..., -nxt.top_k:]
            mx.eval(inds, guess)
        host_inds = np.array(inds)
        needed, local = np.unique(host_inds, return_inverse=True)
        if self._predicted is not None:
            self.prediction_counts[0] += int(np.isin(needed, self._predicted).sum())
            self.prediction_counts[1] += len(needed)
            self._predicted = None
        group = max(self.max_fetch, self.top_k)  # a decode step's k records always go together
        if x2.shape[0] == 1 and hasattr(self._source, "fetch_streamed"):
            y = self._experts_as_they_land(x2, scores, needed, local.reshape(-1))
            self._prefetch_next(nxt, guess if nxt is not None else None)
            return y
        if not self.max_fetch or len(needed) <= group:
            weights, rows = self._source.fetch(self.layer, needed)
            self._prefetch_next(nxt, guess if nxt is not None else None)
            return kernels.expert_mlp(x2, weights, mx.array(rows[local].reshape(host_inds.shape).astype(np.int32)),
                                      scores, out_dtype=mx.float32)
        return self._grouped_experts(x2, scores, needed, local.reshape(host_inds.shape), group)

    def _prefetch_next(self, nxt: Optional["StreamingMoE"], guess: Optional[mx.array]) -> None:
        if nxt is not None and hasattr(self._source, "prefetch"):  # after our reads: they come first
            nxt._predicted = np.unique(np.array(guess))
            self._source.prefetch(nxt.layer, nxt._predicted)

    def _experts_as_they_land(self, x2: mx.array, scores: mx.array, needed: np.ndarray,
                              local: np.ndarray) -> mx.array:
        """One token's routed experts, computed in ``read_chunks`` groups: each group starts on
        the device as soon as its records are in, while the reader works on the next ones."""
        weights, rows, pending = self._source.fetch_streamed(self.layer, needed)
        chunks = 1  # cache hits, or reads too small to be worth overlapping: all at once
        if pending is not None and pending.nbytes >= self.chunk_min_bytes:
            chunks = min(self.read_chunks, len(needed))
        if chunks == 1:
            if pending is not None:
                pending.finish()
            y = kernels.expert_mlp(x2, weights, mx.array(rows[local][None].astype(np.int32)), scores,
                                   out_dtype=mx.float32)
            self._source.in_use(y)
            return y
        y = None
        for part in np.array_split(np.arange(len(needed)), chunks):
            pending.wait(part)
            if part[-1] == len(needed) - 1:
                pending.finish()  # every record is in: the I/O time ends here
            slots = np.nonzero((local >= part[0]) & (local <= part[-1]))[0]  # the top-k slots it serves
            at = mx.array(rows[local[slots]][None].astype(np.int32))
            part_y = kernels.expert_mlp(x2, weights, at, scores[:, mx.array(slots.astype(np.int32))],
                                        out_dtype=mx.float32)
            y = part_y if y is None else y + part_y
            mx.async_eval(y)
        self._source.in_use(y)
        return y

    def _grouped_experts(self, x2: mx.array, scores: mx.array, needed: np.ndarray, local: np.ndarray,
                         size: int) -> mx.array:
        """The routed experts' sum, reading ``size`` experts at a time (still each once)."""
        y = mx.zeros(x2.shape, dtype=mx.float32)
        for start in range(0, len(needed), size):
            group = needed[start:start + size]
            tok, slot = np.nonzero((local >= start) & (local < start + len(group)))  # the (token, j) pairs it serves
            weights, rows = self._source.fetch(self.layer, group)
            tok_mx = mx.array(tok.astype(np.int32))
            at = rows[local[tok, slot] - start]
            part = kernels.expert_mlp(x2[tok_mx], weights, mx.array(at[:, None].astype(np.int32)),
                                      scores[tok_mx, mx.array(slot.astype(np.int32))][:, None], out_dtype=mx.float32)
            y = y.at[tok_mx].add(part)
            mx.eval(y)  # this group's records can be freed before the next group is read
        return y


def _weight_arrays(w: ExpertWeights) -> list:
    return [a for p in (w.gate, w.up, w.down) for a in (p.weight, p.scales, p.biases) if a is not None]


def _weights_from(arrays: list, bits: int, group_size: int) -> ExpertWeights:
    """The inverse of ``_weight_arrays`` (quantized: three arrays per projection; else one)."""
    n = 3 if bits < 16 else 1
    projs = [Projection(*arrays[i:i + n]) for i in range(0, 3 * n, n)]
    return ExpertWeights(*projs, bits=bits, group_size=group_size)


class _Lookups:
    """The device-side slot lookups of one speculative step: (layer, inds, rows) per MoE layer.
    (A plain object, not a list: an ``nn.Module`` would take a list's arrays for parameters.)"""

    def __init__(self):
        self.entries: list = []


def _cache_state(cache: Optional[list]) -> Optional[list]:
    """What a forward pass changes in mlx-lm's caches (offsets, state lists), to undo it.
    A KV cache's arrays are written in place past its offset; restoring the offset is enough."""
    if cache is None:
        return None
    return [None if c is None else {k: list(v) if isinstance(v, list) else v for k, v in vars(c).items()}
            for c in cache]


def _restore_cache(cache: Optional[list], state: Optional[list]) -> None:
    for c, saved in zip(cache or [], state or []):
        if c is not None:
            vars(c).clear()
            vars(c).update(saved)


class StreamingModel:
    """What every streaming architecture's ``Model`` adds to mlx-lm's model protocol.

    Architectures define ``forward(inputs, cache, input_embeddings)``; calling the model runs it,
    and runs a decode step speculatively when the expert cache held every expert of the step
    before: each MoE layer then looks its experts' slots up on the device instead of syncing
    with the host, one check after the pass confirms that every expert was there, and a step
    that missed one is undone (caches restored) and run again the synchronous way.
    """

    expert_reader = None  # the ExpertReader, set by flash_moe.load

    @property
    def expert_source(self) -> Optional[ExpertSource]:
        """Where the MoE layers get their experts (shared by all of them), once loaded."""
        blocks = self.moe_blocks()
        return blocks[0]._source if blocks else None

    def __call__(self, inputs: mx.array, cache: Optional[list] = None,
                 input_embeddings: Optional[mx.array] = None) -> mx.array:
        source = self.expert_source
        if inputs.shape[-1] != 1 or input_embeddings is not None or not getattr(source, "speculative_lookups", False):
            return self.forward(inputs, cache, input_embeddings)
        if source.speculating:
            out = self._speculative_step(inputs, cache, source)
            if out is not None:
                return out
        reads = source.reader.stats.reads
        out = self.forward(inputs, cache)
        source.speculating = source.reader.stats.reads == reads  # every expert was in the cache
        return out

    def _speculative_step(self, inputs, cache, source) -> Optional[mx.array]:
        blocks = self.moe_blocks()
        saved = _cache_state(cache)
        lookups = _Lookups()
        for block in blocks:
            block._lookups = lookups
        try:
            out = self.forward(inputs, cache)
        finally:
            for block in blocks:
                block._lookups = None
        if not lookups.entries:  # no MoE layer looked anything up
            return out
        all_found = mx.concatenate([rows.reshape(-1) for _, _, rows in lookups.entries]).min() >= 0
        experts = mx.concatenate([inds.reshape(-1) for _, inds, _ in lookups.entries])
        # The one sync of the step waits for the last router only: the device goes on with the
        # last layer's experts and the head while the host checks and updates the LRU order.
        mx.async_eval(out)
        mx.eval(all_found, experts)
        if all_found.item():
            source.speculative_steps += 1
            per_layer = np.split(np.array(experts), len(lookups.entries))  # one copy to the host
            source.confirm([(layer, e) for (layer, _, _), e in zip(lookups.entries, per_layer)])
            return out
        _restore_cache(cache, saved)
        source.speculating = False
        source.speculation_failures += 1
        return None

    @staticmethod
    def attention_cache(max_kv_size: Optional[int] = None):
        """An attention layer's KV cache: unbounded, or a window of ``max_kv_size`` tokens kept
        as mlx-lm's rotating cache keeps them (the first 4 tokens stay)."""
        return KVCache() if max_kv_size is None else RotatingKVCache(max_size=max_kv_size, keep=4)

    def moe_blocks(self) -> list:
        return [layer.mlp for layer in self.layers if isinstance(getattr(layer, "mlp", None), StreamingMoE)]

    @property
    def experts_per_token(self) -> int:
        return self.moe_blocks()[0].top_k

    def set_experts_per_token(self, k: int) -> None:
        """Route each token to ``k`` experts (fewer reads, lower quality; up to num_experts)."""
        blocks = self.moe_blocks()
        if not 1 <= int(k) <= blocks[0].num_experts:
            raise ValueError(f"experts_per_token must be in 1..{blocks[0].num_experts}, got {k}")
        for block in blocks:
            block.top_k = int(k)

    def set_prefetch(self, on: bool = True) -> None:
        """Predict each MoE layer's experts from the previous one and start their reads early."""
        blocks = self.moe_blocks()
        for block, nxt in zip(blocks, blocks[1:] + [None]):
            block._next = nxt if on else None
            block._predicted = None
            block.prediction_counts = [0, 0]

    def prefetch_accuracy(self) -> float:
        """Fraction of the experts the layers needed that the previous layer had predicted."""
        hit = sum(b.prediction_counts[0] for b in self.moe_blocks())
        total = sum(b.prediction_counts[1] for b in self.moe_blocks())
        return hit / total if total else 0.0

    def attach_experts(self, source: ExpertSource) -> None:
        for block in self.moe_blocks():
            block._source = source
