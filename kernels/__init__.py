"""Fused OECL loss (NT-Xent + OE feature-norm penalty) with a plain-torch twin.

Triton is imported only when the Triton backend is first used, so this package imports
on machines without triton.
"""

from ._common import NTXentOEOutput
from .ntxent_oe_torch import ntxent_oe_dense

# isort: split
# After the twin's module: loading `kernels.ntxent_oe_torch` binds that name in this package
# to the module, and the twin's entry point (the function of the same name) must win.
from .ntxent_oe import ntxent_oe, ntxent_oe_torch

__all__ = ["NTXentOEOutput", "ntxent_oe", "ntxent_oe_dense", "ntxent_oe_torch"]
