"""The threaded expert reader: parallel ``pread`` of the records the router chose."""

from __future__ import annotations

import concurrent.futures
import os
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import CorruptRecordError, ModelFormatError
from .format import Manifest


def aligned_buffer(nbytes: int, alignment: int = 4096) -> np.ndarray:
    """A uint8 buffer whose address is a multiple of ``alignment`` (needed for O_DIRECT)."""
    raw = np.empty(nbytes + alignment, dtype=np.uint8)
    start = (-raw.ctypes.data) % alignment
    return raw[start: start + nbytes]


@dataclass
class IOStats:
    """Counters of the expert reads since the last reset."""

    reads: int = 0  # records read from the files
    bytes: int = 0  # bytes read from the files
    cache_hits: int = 0  # records served by the expert cache (no read)
    seconds: float = 0.0  # wall time spent waiting for reads
    per_layer: Dict[int, list] = field(default_factory=dict)  # layer -> [reads, bytes, seconds]

    @property
    def hit_rate(self) -> float:
        total = self.reads + self.cache_hits
        return self.cache_hits / total if total else 0.0

    def copy(self) -> "IOStats":
        return IOStats(self.reads, self.bytes, self.cache_hits, self.seconds,
                       {k: list(v) for k, v in self.per_layer.items()})

    def __sub__(self, other: "IOStats") -> "IOStats":
        return IOStats(self.reads - other.reads, self.bytes - other.bytes, self.cache_hits - other.cache_hits,
                       self.seconds - other.seconds)


# Smallest piece of a record one thread reads when a record is split across threads.
MIN_STRIPE = 256 * 1024


class _Done:
    """A finished task, for reads that ran on the calling thread."""

    def result(self) -> None:
        return None


class PendingRead:
    """Records being read into their destination arrays, in the order they were asked for.

    The pool's threads take the pieces first in, first out, so the first records tend to land
    first: the caller can start computing with them (``wait``) while later ones are read.
    """

    def __init__(self, reader: "ExpertReader", layer: int, futures: List[list], t0: float):
        self._reader, self._layer, self._futures, self._t0 = reader, layer, futures, t0
        self._finished = False

    @property
    def nbytes(self) -> int:
        return len(self._futures) * self._reader.record_size

    def wait(self, records: Iterable[int]) -> None:
        """Block until the records at these positions have landed (a read error raises here,
        once no thread of this request writes any more)."""
        try:
            for j in records:
                for f in self._futures[j]:
                    f.result()
        except BaseException:
            concurrent.futures.wait([f for fs in self._futures for f in fs if not isinstance(f, _Done)])
            self._finished = True
            raise

    def finish(self) -> None:
        """Wait for every record and count the request in the reader's statistics."""
        if self._finished:
            return
        self.wait(range(len(self._futures)))
        self._finished = True
        self._reader._count(self._layer, len(self._futures), time.perf_counter() - self._t0)


class ExpertReader:
    """Reads expert records of a packed model with a pool of threads.

    Args:
        model_dir: the packed model directory.
        manifest: its manifest (``load_manifest``).
        threads: reads in flight at once; a record is one ``preadv``, or is split across
            threads (pieces of at least 256 KB) when a request has fewer records than threads.
        check: "first" verifies a record's CRC-32 the first time this process reads it,
            "always" on every read, "never" trusts the files.
        direct: open the files with O_DIRECT (Linux) / F_NOCACHE (macOS) to bypass the page cache.
    """

    def __init__(self, model_dir: str | os.PathLike, manifest: Manifest, *, threads: int = 8,
                 check: str = "first", direct: bool = False):
        if check not in ("first", "always", "never"):
            raise ValueError(f"check must be 'first', 'always' or 'never', not {check!r}")
        self.model_dir = Path(model_dir)
        self.manifest = manifest
        self.record_size = manifest.layout.record_size
        self.check = check
        self.direct = direct
        self.stats = IOStats()
        self._paths = {e.layer: self.model_dir / e.file for e in manifest.layers}
        self._checksums = {e.layer: e.checksums for e in manifest.layers}
        self._verified = {e.layer: np.zeros(manifest.num_experts, dtype=bool) for e in manifest.layers}
        self._fds = {layer: self._open(path) for layer, path in self._paths.items()}
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="flash-moe-io") if threads > 1 else None
        self._buffers = [aligned_buffer(0), aligned_buffer(0)]  # ring of two: one in use, one being filled
        # The record as (offset, nbytes) pieces in file order: the tensors, and the padding
        # between them (which scatter reads send to a scratch buffer).
        self._pieces: List[Tuple[int, int, int]] = []  # (offset, nbytes, tensor index or -1)
        at = 0
        for i, slot in sorted(enumerate(manifest.layout.tensors), key=lambda t: t[1].offset):
            if slot.offset > at:
                self._pieces.append((at, slot.offset - at, -1))
            self._pieces.append((slot.offset, slot.nbytes, i))
            at = slot.offset + slot.nbytes
        if at < self.record_size:
            self._pieces.append((at, self.record_size - at, -1))
        self._padding = sum(n for _, n, i in self._pieces if i < 0)
        self._next = 0
        self.prefetched = 0  # records handed to prefetch() (kernel readahead), not counted in stats

    def _open(self, path: Path) -> int:
        flags = os.O_RDONLY
        if self.direct and sys.platform.startswith("linux"):
            flags |= os.O_DIRECT
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise ModelFormatError(f"{path}: cannot open expert file ({exc.strerror}). "
                                   "Check the path, or re-run `flash-moe convert`.") from exc
        if self.direct and sys.platform == "darwin":
            import fcntl
            fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)
        return fd

    # -- reading ---------------------------------------------------------------------------
    def _buffer(self, n: int) -> np.ndarray:
        i = self._next
        self._next ^= 1
        if self._buffers[i].shape[0] < n * self.record_size:
            self._buffers[i] = aligned_buffer(n * self.record_size, self.manifest.layout.alignment)
        return self._buffers[i][: n * self.record_size].reshape(n, self.record_size)

    def _read_one(self, layer: int, expert: int, out: np.ndarray) -> None:
        self._read_raw(layer, expert, out)
        if self.check == "always" or (self.check == "first" and not self._verified[layer][expert]):
            self._verify(layer, expert, out)

    def _read_raw(self, layer: int, expert: int, out: np.ndarray) -> None:
        self._read_views(layer, expert, [memoryview(out)])

    def _read_views(self, layer: int, expert: int, views: List[memoryview], start: int = 0) -> None:
        """Bytes ``start``.. of the record of ``expert`` into ``views`` in order (by default
        the whole record: their sizes add up to it)."""
        fd, size, offset = self._fds[layer], sum(v.nbytes for v in views), expert * self.record_size + start
        done = 0
        while done < size:  # a short read resumes where it stopped
            start, skip = 0, done
            while skip >= views[start].nbytes:
                skip -= views[start].nbytes
                start += 1
            try:
                got = os.preadv(fd, [views[start][skip:]] + views[start + 1:], offset + done)
            except OSError as exc:
                raise ModelFormatError(f"{self._paths[layer]}: read error at byte {offset + done} "
                                       f"(layer {layer}, expert {expert}): {exc.strerror}. "
                                       "Check the disk; `flash-moe verify` checks every record.") from exc
            if got == 0:
                raise ModelFormatError(f"{self._paths[layer]}: file ends at byte {offset + done}, inside "
                                       f"the record of expert {expert} (layer {layer}): truncated. "
                                       "Re-run `flash-moe convert`.")
            done += got

    def _record_views(self, row: int, into: Sequence[np.ndarray]) -> List[memoryview]:
        """The record's pieces in file order: row ``row`` of each tensor's destination, and a
        scratch buffer for the padding between them."""
        scratch = memoryview(np.empty(self._padding, dtype=np.uint8))
        views, used = [], 0
        for _, nbytes, i in self._pieces:
            if i < 0:
                views.append(scratch[used: used + nbytes])
                used += nbytes
            else:
                views.append(memoryview(into[i][row]).cast("B"))
        return views

    def _needs_check(self, layer: int, expert: int) -> bool:
        return self.check == "always" or (self.check == "first" and not self._verified[layer][expert])

    def _read_scattered(self, layer: int, expert: int, row: int, into: Sequence[np.ndarray]) -> None:
        """One record straight into row ``row`` of each tensor's destination (one ``preadv``)."""
        views = self._record_views(row, into)
        self._read_views(layer, expert, views)
        if self._needs_check(layer, expert):
            crc = 0
            for v in views:
                crc = zlib.crc32(v, crc)
            self._check_crc(layer, expert, crc)

    def _stripes(self, views: List[memoryview], n: int) -> List[Tuple[int, List[memoryview]]]:
        """Cut a record's views into ``n`` consecutive byte ranges: [(start, views)]."""
        bounds = [self.record_size * i // n for i in range(n + 1)]
        out, at, vi, skip = [], 0, 0, 0
        for end in bounds[1:]:
            start, part = at, []
            while at < end:
                v = views[vi]
                take = min(v.nbytes - skip, end - at)
                part.append(v[skip: skip + take])
                at += take
                skip += take
                if skip == v.nbytes:
                    vi, skip = vi + 1, 0
            out.append((start, part))
        return out

    def _verify(self, layer: int, expert: int, record: np.ndarray) -> None:
        self._check_crc(layer, expert, zlib.crc32(record))

    def _check_crc(self, layer: int, expert: int, crc: int) -> None:
        if crc != self._checksums[layer][expert]:
            raise CorruptRecordError(
                f"{self._paths[layer]}: the record of expert {expert} (layer {layer}, bytes "
                f"{expert * self.record_size}..{(expert + 1) * self.record_size}) fails its checksum: the "
                "file is corrupt. Run `flash-moe verify` to list every bad record, then re-convert the model.")
        self._verified[layer][expert] = True

    def read(self, layer: int, experts: Sequence[int], into: Optional[Sequence[np.ndarray]] = None,
             rows: Optional[Sequence[int]] = None) -> Optional[np.ndarray]:
        """Read the records of ``experts`` of MoE layer ``layer``.

        Without ``into``: returns a [len(experts), record_size] uint8 view of an internal
        buffer, valid until the call after next (two buffers rotate).

        With ``into`` (one uint8 array per tensor of the layout, in layout order, each at least
        [len(experts), tensor bytes]): the record of ``experts[j]`` lands in row ``j`` of each,
        read straight from the file with no intermediate buffer (``rows``, if given, names
        the row of each expert instead); returns None. With direct reads (whose buffers must be
        aligned) the records pass through the aligned buffer.
        """
        if into is not None:
            self.submit(layer, experts, into, rows).finish()
            return None
        t0 = time.perf_counter()
        out = self._buffer(len(experts))
        self._run([(self._read_one, layer, int(e), out[j]) for j, e in enumerate(experts)])
        self._count(layer, len(experts), time.perf_counter() - t0)
        return out

    def submit(self, layer: int, experts: Sequence[int], into: Sequence[np.ndarray],
               rows: Optional[Sequence[int]] = None) -> PendingRead:
        """Start reading ``experts`` into ``into`` (as ``read`` does) and return at once.

        Records are queued in order, each split into just enough pieces (of at least 256 KB)
        to keep every thread busy; the first ones land first, so the caller can compute with
        them (``PendingRead.wait``) while the rest are read. Records whose CRC is due are read
        whole (the check needs all of it). Direct reads run to the end before this returns.
        """
        experts = [int(e) for e in experts]
        rows = list(range(len(experts))) if rows is None else [int(r) for r in rows]
        t0 = time.perf_counter()
        if self.direct:
            out = self._buffer(len(experts))
            self._run([(self._read_one, layer, e, out[j]) for j, e in enumerate(experts)])
            self.manifest.layout.scatter(out, into, rows)
            return PendingRead(self, layer, [[_Done()] for _ in experts], t0)
        # More pieces per record than that measured slower (threads contend on one file range).
        stripes = max(1, min(-(-self.threads // max(1, len(experts))), self.record_size // MIN_STRIPE))
        futures = []
        for e, r in zip(experts, rows):
            if self._pool is None or self._needs_check(layer, e) or stripes == 1:
                tasks = [(self._read_scattered, layer, e, r, into)]
            else:
                tasks = [(self._read_views, layer, e, part, start)
                         for start, part in self._stripes(self._record_views(r, into), stripes)]
            if self._pool is None:
                for fn, *args in tasks:
                    fn(*args)
                futures.append([_Done()])
            else:
                futures.append([self._pool.submit(*t) for t in tasks])
        return PendingRead(self, layer, futures, t0)

    def _count(self, layer: int, records: int, seconds: float) -> None:
        nbytes = records * self.record_size
        s = self.stats
        s.reads += records
        s.bytes += nbytes
        s.seconds += seconds
        layer_stats = s.per_layer.setdefault(layer, [0, 0, 0.0])
        layer_stats[0] += records
        layer_stats[1] += nbytes
        layer_stats[2] += seconds

    def _run(self, tasks: list) -> None:
        if self._pool is None or len(tasks) <= 1:
            for fn, *args in tasks:
                fn(*args)
        else:
            for f in [self._pool.submit(*t) for t in tasks]:
                f.result()

    def prefetch(self, layer: int, experts: Sequence[int]) -> int:
        """Ask the kernel to start reading these records into the page cache, without waiting.

        ``posix_fadvise(WILLNEED)`` queues the reads and returns: the disk works while the caller
        computes, and the later ``read`` of a record that arrived is a page-cache copy. No-op with
        direct reads, or where the call does not exist. Returns
        the number of records asked for.
        """
        if self.direct or not hasattr(os, "posix_fadvise"):
            return 0
        fd, size, n = self._fds[layer], self.record_size, 0
        for e in experts:
            e = int(e)
            os.posix_fadvise(fd, e * size, size, os.POSIX_FADV_WILLNEED)
            n += 1
        self.prefetched += n
        return n

    # -- whole-file checks -----------------------------------------------------------------
    def verify(self, progress: bool = True) -> list:
        """Check every record's CRC-32; returns the list of (file, layer, expert) that fail."""
        from tqdm.auto import tqdm

        bad = []
        total = len(self._paths) * self.manifest.num_experts
        buf = aligned_buffer(self.record_size, self.manifest.layout.alignment)
        with tqdm(total=total, unit="record", desc="verify", disable=not progress) as bar:
            for layer in self._paths:
                for e in range(self.manifest.num_experts):
                    self._read_raw(layer, e, buf)
                    if zlib.crc32(buf) != self._checksums[layer][e]:
                        bad.append((str(self._paths[layer]), layer, e))
                    bar.update(1)
        return bad

    def drop_page_cache(self) -> None:
        """Ask the OS to evict this model's expert files from the page cache (Linux)."""
        if hasattr(os, "posix_fadvise"):
            for fd in self._fds.values():
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
