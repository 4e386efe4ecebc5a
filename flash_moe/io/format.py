"""The packed on-disk format.

A packed model directory holds:

- ``manifest.json``: format version, model config, quantization, the record layout, one
  entry per MoE layer (file, size, a CRC-32 per record). Written last and atomically, so a
  directory without it is an unfinished conversion and never loads.
- ``resident-*.safetensors``: every weight that is not a routed expert, in the model's own
  parameter names (quantized the mlx-lm way when bits < 16).
- ``experts/layer_XXX.bin``: for each MoE layer, ``num_experts`` fixed-size records. Record
  ``e`` starts at ``e * record_size``; ``record_size`` is a multiple of the alignment (4 KiB
  or 16 KiB) so that one expert is one aligned, contiguous read (O_DIRECT / F_NOCACHE capable).
  Inside a record the gate, up and down projections (weight, scales, biases) sit at fixed
  offsets given by the manifest's ``layout``.
- the tokenizer files and the source ``config.json``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..errors import ModelFormatError

FORMAT_NAME = "flash-moe"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
EXPERTS_DIR = "experts"
TENSOR_ALIGN = 64  # alignment of each tensor inside a record (cache line, vector loads)

# numpy dtypes for the record tensors; bfloat16 travels as its uint16 bits
DTYPES = {"uint32": np.uint32, "float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


@dataclass
class TensorSlot:
    """Where one tensor of an expert lives inside a record."""

    name: str  # e.g. "gate.weight", "down.scales"
    dtype: str  # key of DTYPES
    shape: List[int]
    offset: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(DTYPES[self.dtype]).itemsize


@dataclass
class ExpertLayout:
    """The byte layout of one expert record (identical for every expert of every layer)."""

    bits: int  # 2, 4, 8, or 16 (unquantized)
    group_size: int
    mode: str
    record_size: int
    alignment: int
    tensors: List[TensorSlot]

    @classmethod
    def build(cls, shapes: Dict[str, tuple], dtypes: Dict[str, str], *, bits: int, group_size: int,
              alignment: int, mode: str = "affine") -> "ExpertLayout":
        """Lay out tensors in the given order, each at a TENSOR_ALIGN offset."""
        slots, offset = [], 0
        for name, shape in shapes.items():
            slot = TensorSlot(name, dtypes[name], [int(s) for s in shape], offset)
            slots.append(slot)
            offset = round_up(offset + slot.nbytes, TENSOR_ALIGN)
        return cls(bits, group_size, mode, round_up(offset, alignment), alignment, slots)

    def scatter(self, records, into, rows) -> None:
        """Copy each tensor's bytes of ``records`` ([n, record_size] uint8) into rows ``rows``
        of its destination in ``into`` (one [*, nbytes] uint8 array per tensor, layout order)."""
        for slot, dest in zip(self.tensors, into):
            dest[rows] = records[:, slot.offset: slot.offset + slot.nbytes]

    def slot(self, name: str) -> TensorSlot:
        for s in self.tensors:
            if s.name == name:
                return s
        raise KeyError(name)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ExpertLayout":
        d = dict(d)
        d["tensors"] = [TensorSlot(**t) for t in d["tensors"]]
        return cls(**d)


@dataclass
class LayerEntry:
    layer: int
    file: str  # relative to the model directory
    checksums: List[int]  # CRC-32 of each full record (padding included)


@dataclass
class Manifest:
    model_type: str
    config: Dict[str, Any]  # the flat text config the model is built from
    layout: ExpertLayout
    num_experts: int
    layers: List[LayerEntry]
    resident_files: List[str]
    resident_quantization: Optional[Dict[str, Any]] = None  # mlx-lm style, None when unquantized
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION
    source: Dict[str, Any] = field(default_factory=dict)

    @property
    def moe_layers(self) -> List[int]:
        return [entry.layer for entry in self.layers]

    def entry(self, layer: int) -> LayerEntry:
        for e in self.layers:
            if e.layer == layer:
                return e
        raise KeyError(layer)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Manifest":
        d = dict(d)
        d["layout"] = ExpertLayout.from_dict(d["layout"])
        d["layers"] = [LayerEntry(**e) for e in d["layers"]]
        return cls(**d)


def write_json_atomic(path: Path, data: Dict[str, Any]) -> None:
    """Write JSON to a temporary file, fsync it, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_manifest(model_dir: str | os.PathLike) -> Manifest:
    """Read and check a packed model's manifest against the files beside it.

    Raises ModelFormatError naming the file and the fix when the manifest is missing,
    of another format or version, or when an expert file is missing or has the wrong size.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelFormatError(f"{model_dir}: no such directory. Pass the directory written by `flash-moe convert`.")
    path = model_dir / MANIFEST_NAME
    if not path.exists():
        hint = ("it looks like a Hugging Face checkpoint: convert it first with "
                f"`flash-moe convert {model_dir} DST`" if (model_dir / "config.json").exists()
                and not (model_dir / EXPERTS_DIR).exists() else
                "the conversion did not finish: run `flash-moe convert` again with --resume or --overwrite")
        raise ModelFormatError(f"{path}: missing. {model_dir} is not a packed flash-moe model ({hint}).")
    try:
        data = json.loads(path.read_text())
        manifest = Manifest.from_dict(data)
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelFormatError(f"{path}: unreadable manifest ({exc}). Re-run `flash-moe convert`.") from exc
    if manifest.format != FORMAT_NAME or manifest.version != FORMAT_VERSION:
        raise ModelFormatError(
            f"{path}: format {manifest.format!r} version {manifest.version}, this flash-moe reads "
            f"{FORMAT_NAME!r} version {FORMAT_VERSION}. Re-convert the model with this version.")
    check_files(model_dir, manifest)
    return manifest


def check_files(model_dir: Path, manifest: Manifest) -> None:
    """Every file the manifest names exists with the size it implies."""
    expected = manifest.num_experts * manifest.layout.record_size
    for entry in manifest.layers:
        f = model_dir / entry.file
        if not f.exists():
            raise ModelFormatError(f"{f}: expert file missing (layer {entry.layer}). Re-run `flash-moe convert`.")
        size = f.stat().st_size
        if size != expected:
            raise ModelFormatError(
                f"{f}: {size} bytes, the manifest expects {expected} ({manifest.num_experts} records of "
                f"{manifest.layout.record_size} B): the file is truncated or from another conversion. "
                "Re-run `flash-moe convert`.")
        if len(entry.checksums) != manifest.num_experts:
            raise ModelFormatError(f"{model_dir / MANIFEST_NAME}: layer {entry.layer} lists "
                                   f"{len(entry.checksums)} checksums for {manifest.num_experts} experts.")
    for name in manifest.resident_files:
        if not (model_dir / name).exists():
            raise ModelFormatError(f"{model_dir / name}: resident weights missing. Re-run `flash-moe convert`.")
