"""The CUDA driver (``libcuda``) through ctypes, for what MLX does not expose: memory advice
(``io/placement``) and the device's multiprocessor count (launch shapes)."""

from __future__ import annotations

import ctypes
import functools
from typing import Optional, Tuple

_MULTIPROCESSOR_COUNT = 16  # CUdevice_attribute


@functools.lru_cache(maxsize=1)
def driver() -> Tuple[Optional[Tuple[ctypes.CDLL, ctypes.c_void_p]], str]:
    """``((libcuda, primary context of device 0), "")``, or ``(None, why not)``."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        device, ctx = ctypes.c_int(), ctypes.c_void_p()
        if lib.cuInit(0) or lib.cuDeviceGet(ctypes.byref(device), 0) or \
                lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), device):
            return None, "no CUDA device 0 or its primary context"
        return (lib, ctx), ""
    except (OSError, AttributeError) as exc:
        return None, str(exc)


@functools.lru_cache(maxsize=1)
def multiprocessors() -> Optional[int]:
    """Streaming multiprocessors of CUDA device 0 (the one MLX computes on), or None."""
    found, _ = driver()
    if found is None:
        return None
    lib, device, count = found[0], ctypes.c_int(), ctypes.c_int()
    if lib.cuDeviceGet(ctypes.byref(device), 0) or \
            lib.cuDeviceGetAttribute(ctypes.byref(count), _MULTIPROCESSOR_COUNT, device):
        return None
    return count.value or None
