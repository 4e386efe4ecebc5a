"""Where record arrays live on MLX's CUDA backend (a no-op everywhere else).

MLX CUDA allocates every array in managed memory. A record the CPU writes and the GPU then
reads migrates a page at a time on the GPU's faults, and back again on the next CPU write:
measured on an H200 host, that cycle moves 2.7 GB/s. Streamed records are read by the GPU once,
so they are better kept in host memory with the GPU mapped to read them over the bus: the same
cycle then moves 8.2 GB/s, the GPU's read alone 37 GB/s (70 MB, median of 6; the streaming
benchmark's "raw disk" rows measure both ways). The expert cache's slots are the opposite case,
written once and read at every hit: after the CPU writes one, it is moved back to device memory
in bulk (the first 24 tokens after filling a cache ran 4-5x faster than with fault-driven
migration on an H200). On the CPU and on Apple's unified memory there is nothing to do.

The driver is reached through ``libcuda`` with ctypes: MLX exposes no memory advice.
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings
from typing import Optional, Sequence, Tuple

import numpy as np

from ..kernels import cuda_driver, gpu_target

_SET_PREFERRED_LOCATION, _UNSET_PREFERRED_LOCATION = 3, 4
_SET_ACCESSED_BY, _UNSET_ACCESSED_BY = 5, 6
_LOCATION_DEVICE, _LOCATION_HOST = 1, 2


class _Location(ctypes.Structure):  # CUmemLocation
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


def on_cuda() -> bool:
    """True when MLX computes on an NVIDIA GPU (managed memory shared with the host)."""
    return gpu_target() == "cuda"


@functools.lru_cache(maxsize=1)
def _driver() -> Optional[Tuple[ctypes.CDLL, ctypes.c_void_p]]:
    """libcuda and the primary context MLX runs in, or None (with one warning) if unusable."""
    found, why = cuda_driver.driver()
    if found is not None and not hasattr(found[0], "cuMemAdvise_v2"):
        found, why = None, "this driver has no cuMemAdvise_v2"
    if found is None:
        warnings.warn(f"flash-moe: cannot advise the CUDA driver on memory placement ({why}); "
                      "streamed records will migrate page by page (slower, still correct)")
        return None
    found[0].cuMemAdvise_v2.argtypes = [ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int, _Location]
    return found


def _advise(views: Sequence[np.ndarray], advice: Sequence[Tuple[int, int]]) -> bool:
    driver = _driver()
    if driver is None:
        return False
    lib, ctx = driver
    lib.cuCtxSetCurrent(ctx)  # the context is per thread; MLX made it current only on its own
    for view in views:
        for code, location in advice:
            rc = lib.cuMemAdvise_v2(view.ctypes.data, view.nbytes, code, _Location(location, 0))
            if rc:
                warnings.warn(f"flash-moe: cuMemAdvise({code}) failed with CUDA error {rc}; "
                              "streamed records will migrate page by page (slower, still correct)")
                return False
    return True


def keep_on_host(views: Sequence[np.ndarray]) -> bool:
    """Keep the memory behind these views (of MLX arrays) in host RAM, mapped for the GPU.

    Returns True if the advice was applied (MLX CUDA), False where it does not apply or when
    the environment sets ``FLASH_MOE_HOST_READ_BUFFERS=0``.
    """
    if not on_cuda() or os.environ.get("FLASH_MOE_HOST_READ_BUFFERS", "1") == "0":
        return False
    return _advise(views, [(_SET_PREFERRED_LOCATION, _LOCATION_HOST), (_SET_ACCESSED_BY, _LOCATION_DEVICE)])


def move_to_device(views: Sequence[np.ndarray], rows: Sequence[int]) -> bool:
    """Start moving ``rows`` of these views (of MLX arrays the CPU just wrote) to device memory
    in bulk, so that the GPU's first reads find them there instead of migrating a page at a
    fault (the expert cache's slots: read once from disk, then read by the GPU at every hit).

    Asynchronous (the driver's copy engine, on the default stream, not MLX's: a read that comes
    first still faults the pages over, correctly). Returns True where it applies (MLX CUDA).
    """
    driver = _driver() if on_cuda() else None
    if driver is None:
        return False
    lib, ctx = driver
    lib.cuCtxSetCurrent(ctx)
    if hasattr(lib, "cuMemPrefetchAsync_v2"):  # CUDA 12.2+ drivers: a location, flags 0
        device = _Location(_LOCATION_DEVICE, 0)
        prefetch = lambda a, n: lib.cuMemPrefetchAsync_v2(a, n, device, ctypes.c_uint(0), ctypes.c_void_p(None))
    else:
        prefetch = lambda a, n: lib.cuMemPrefetchAsync(a, n, ctypes.c_int(0), ctypes.c_void_p(None))
    for view in views:
        stride = view.strides[0]
        for row in rows:
            rc = prefetch(ctypes.c_uint64(view.ctypes.data + int(row) * stride), ctypes.c_size_t(stride))
            if rc:
                warnings.warn(f"flash-moe: cuMemPrefetchAsync failed with CUDA error {rc}; cached "
                              "records will migrate to the GPU page by page (slower, still correct)")
                return False
    return True


def release(views: Sequence[np.ndarray]) -> None:
    """Undo ``keep_on_host`` before MLX recycles the memory for other arrays."""
    _advise(views, [(_UNSET_PREFERRED_LOCATION, _LOCATION_HOST), (_UNSET_ACCESSED_BY, _LOCATION_DEVICE)])
