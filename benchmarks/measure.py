"""Measurements of the streaming benchmark: raw disk bandwidth, decode, prefill, memory caps."""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import mlx.core as mx
import numpy as np


def expert_files(packed: Path) -> List[Path]:
    """The packed model's expert record files, one per MoE layer."""
    return sorted((Path(packed) / "experts").glob("*.bin"))


def fill_expert_cache(model) -> None:
    """Read every expert of every MoE layer into the model's expert cache (sized to hold them):
    the cached rows are then timed without the reads that fill the cache."""
    source, manifest = model.expert_source, model.expert_reader.manifest
    for layer in manifest.moe_layers:
        source.fetch(layer, np.arange(manifest.num_experts))


def drop_page_cache(paths: Sequence[Path]) -> None:
    """Evict files from the OS page cache (clean pages; Linux honours DONTNEED at once)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_page_cache(paths: Sequence[Path]) -> None:
    """Read files whole so that they sit in the page cache."""
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def host_to_device_gbps(nbytes: int, runs: int = 5, on_host: bool = False) -> float:
    """GB/s of moving ``nbytes`` written by the CPU into an MLX array to where the device reads
    them, as every streamed record travels (CPU write, then a device reduction over it). On a
    discrete GPU with MLX CUDA's managed memory this is page migration, or with ``on_host`` (as
    the reader's buffers are kept) a read over the bus; on the CPU, a memcpy."""
    from flash_moe.io import placement

    host = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dest = mx.zeros((nbytes,), dtype=mx.uint8)
    mx.eval(dest)
    view = np.array(dest, copy=False)
    placed = on_host and placement.keep_on_host([view])
    times = []
    for _ in range(runs + 1):
        t0 = time.perf_counter()
        view[:] = host
        mx.eval(dest.view(mx.uint32).sum())
        times.append(time.perf_counter() - t0)
    if placed:
        placement.release([view])
    return nbytes / statistics.median(times[1:]) / 1e9


def raw_read_gbps(paths: Sequence[Path], record_size: int, records: Sequence[tuple], threads: int) -> float:
    """GB/s of parallel ``os.preadv`` of ``records`` ((file index, record index)) after dropping the
    page cache: the ceiling any reader of these files can reach."""
    drop_page_cache(paths)
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    bufs = [bytearray(record_size) for _ in range(threads)]

    def read(i: int) -> None:
        f, r = records[i]
        view = memoryview(bufs[i % threads])
        done = 0
        while done < record_size:
            done += os.preadv(fds[f], [view[done:]], r * record_size + done)

    try:
        t0 = time.perf_counter()
        if threads == 1:
            for i in range(len(records)):
                read(i)
        else:
            # One chunk of records per worker so no two threads share a buffer at once.
            def worker(w: int) -> None:
                for i in range(w, len(records), threads):
                    read(i)
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(worker, range(threads)))
        seconds = time.perf_counter() - t0
    finally:
        for fd in fds:
            os.close(fd)
    return len(records) * record_size / seconds / 1e9


def prompt_ids(n: int, seed: int = 0, vocab: int = 259) -> List[int]:
    """Random byte-token ids (3..vocab): routing varies like real text without a tokenizer."""
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


def decode(model, make_cache: Callable, prompt: Sequence[int], n_tokens: int, reader=None,
           before: Optional[Callable] = None) -> Dict[str, float]:
    """Greedy decode of ``n_tokens`` after ``prompt``; ``before`` runs between prefill and decode
    (e.g. drop the page cache). Returns tok/s and, for a streaming model, the I/O figures."""
    cache = make_cache()
    logits = model(mx.array(prompt)[None], cache=cache)
    tok = mx.argmax(logits[:, -1, :], axis=-1)
    mx.eval(tok)
    if before is not None:
        before()
    start = reader.stats.copy() if reader is not None else None
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        logits = model(tok[None], cache=cache)
        tok = mx.argmax(logits[:, -1, :], axis=-1)
        mx.eval(tok)
    wall = time.perf_counter() - t0
    out = {"tok_s": n_tokens / wall, "s_tok": wall / n_tokens}
    if reader is not None:
        d = reader.stats - start
        out.update(bytes_tok=d.bytes / n_tokens, io_s_tok=d.seconds / n_tokens,
                   compute_s_tok=(wall - d.seconds) / n_tokens, hit_rate=d.hit_rate,
                   records_tok=(d.reads + d.cache_hits) / n_tokens)
    return out


def median_runs(fn: Callable[[], Dict[str, float]], runs: int) -> Dict[str, float]:
    """Per-key medians over ``runs`` calls."""
    results = [fn() for _ in range(runs)]
    return {k: statistics.median(r[k] for r in results) for k in results[0]}


class ReadLog:
    """Wraps a reader's ``read`` and ``submit`` to record (layer, experts) of every request: the
    proof that a prompt chunk reads each expert at most once per layer."""

    def __init__(self, reader):
        self.reader, self.calls = reader, []
        self._read, self._submit = reader.read, reader.submit

    def __enter__(self) -> "ReadLog":
        def read(layer, experts, into=None, *args, **kwargs):
            if into is None:  # with ``into``, read goes through submit
                self.calls.append((layer, [int(e) for e in experts]))
            return self._read(layer, experts, into, *args, **kwargs)

        def submit(layer, experts, *args, **kwargs):
            self.calls.append((layer, [int(e) for e in experts]))
            return self._submit(layer, experts, *args, **kwargs)
        self.reader.read, self.reader.submit = read, submit
        return self

    def __exit__(self, *exc) -> None:
        self.reader.read, self.reader.submit = self._read, self._submit

    def max_reads_per_expert_per_layer(self) -> int:
        counts: Dict[tuple, int] = {}
        for layer, experts in self.calls:
            for e in experts:
                counts[(layer, e)] = counts.get((layer, e), 0) + 1
        return max(counts.values()) if counts else 0


def prefill(model, make_cache: Callable, n: int, reader=None, before: Optional[Callable] = None) -> Dict[str, float]:
    """One chunk of ``n`` prompt tokens: tok/s, bytes read, and the repeated-read check."""
    prompt = mx.array(prompt_ids(n, seed=n))[None]
    cache = make_cache()
    if before is not None:
        before()
    start = reader.stats.copy() if reader is not None else None
    log = ReadLog(reader) if reader is not None else None
    if log:
        log.__enter__()
    try:
        t0 = time.perf_counter()
        mx.eval(model(prompt, cache=cache))
        wall = time.perf_counter() - t0
    finally:
        if log:
            log.__exit__()
    out = {"tok_s": n / wall}
    if reader is not None:
        d = reader.stats - start
        out.update(bytes=d.bytes, records=d.reads + d.cache_hits,
                   max_reads=log.max_reads_per_expert_per_layer(),
                   calls_per_layer=max(sum(1 for l, _ in log.calls if l == layer) for layer, _ in log.calls))
    return out
