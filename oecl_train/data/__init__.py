"""Image sources (readers), OE sources and the protocols that turn them into ID/OOD splits."""

from oecl_train.data.reader_base import DataError, ImageSet
from oecl_train.data.readers import READERS, make_reader
from oecl_train.data.splits import Splits, build_splits

__all__ = ["READERS", "DataError", "ImageSet", "Splits", "build_splits", "make_reader"]
