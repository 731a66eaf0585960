"""Fused OECL loss (NT-Xent + OE feature-norm penalty) with a plain-torch twin.

Triton is imported only when the Triton backend is first used, so this package imports
on machines without triton.
"""

from ._common import NTXentOEOutput
from .ntxent_oe import ntxent_oe, ntxent_oe_torch
from .ntxent_oe_twin import ntxent_oe_dense

__all__ = ["NTXentOEOutput", "ntxent_oe", "ntxent_oe_dense", "ntxent_oe_torch"]
