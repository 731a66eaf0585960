"""OECL training, evaluation and export. Importing this package does not import torch."""

from oecl_runtime import __version__

__all__ = ["__version__"]
