"""Dictionaries: one type (:class:`SparseDictionary`) read from every public format."""

from emdiff.dictionaries.base import (
    DictionaryMeta,
    DictionaryShapeError,
    SparseDictionary,
    check_fits,
)
from emdiff.dictionaries.formats import (
    FORMATS,
    DictionaryFormatError,
    detect_format,
    load_dictionary,
)

__all__ = [
    "FORMATS",
    "DictionaryFormatError",
    "DictionaryMeta",
    "DictionaryShapeError",
    "SparseDictionary",
    "check_fits",
    "detect_format",
    "load_dictionary",
]
