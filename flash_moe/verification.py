"""``verify()``: check a packed model's files and every record's checksum."""

from __future__ import annotations

import os
from typing import List, Tuple

from .io.format import load_manifest
from .io.reader import ExpertReader


def verify(path: str | os.PathLike, progress: bool = True) -> List[Tuple[str, int, int]]:
    """Check the manifest against the files, then every expert record's CRC-32.

    Returns the (file, layer, expert) of each corrupt record: an empty list means the
    model is intact. Raises ModelFormatError for a missing or truncated file.
    """
    manifest = load_manifest(path)
    reader = ExpertReader(path, manifest, threads=1, check="never")
    try:
        return reader.verify(progress=progress)
    finally:
        reader.close()
