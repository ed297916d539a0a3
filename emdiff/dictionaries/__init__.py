"""Dictionaries: one type (:class:`SparseDictionary`) read from every public format."""

from emdiff.dictionaries.base import (
    SITES,
    DictionaryMeta,
    DictionaryShapeError,
    Site,
    SparseDictionary,
    check_fits,
)
from emdiff.dictionaries.formats import (
    FORMATS,
    DictionaryFormatError,
    detect_format,
    load_dictionary,
)
from emdiff.dictionaries.hooknames import parse_hook

__all__ = [
    "FORMATS",
    "SITES",
    "DictionaryFormatError",
    "DictionaryMeta",
    "DictionaryShapeError",
    "Site",
    "SparseDictionary",
    "check_fits",
    "detect_format",
    "load_dictionary",
    "parse_hook",
]
