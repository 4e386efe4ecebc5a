"""Errors that tell the user which file is wrong and what to do about it."""

from __future__ import annotations


class FlashMoeError(Exception):
    """Base class of every error flash-moe raises on bad input."""


class ModelFormatError(FlashMoeError):
    """A packed model directory is missing, incomplete, or inconsistent."""


class CorruptRecordError(ModelFormatError):
    """An expert record's bytes do not match the checksum in the manifest."""


class UnsupportedModelError(FlashMoeError):
    """The checkpoint's model_type or layout is not one flash-moe can run."""


class ConversionError(FlashMoeError):
    """Conversion cannot proceed (bad source, existing destination, disk full, ...)."""
