"""Bytes on disk: the packed expert format, its manifest, and the threaded reader."""

from .format import ExpertLayout, Manifest, TensorSlot, load_manifest
from .reader import ExpertReader, IOStats

__all__ = ["ExpertLayout", "ExpertReader", "IOStats", "Manifest", "TensorSlot", "load_manifest"]
