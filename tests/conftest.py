"""Test-wide setup. Triton reads TRITON_INTERPRET once, when it is first imported, so it is set
here, before any test module imports triton: without a GPU the kernels run in its interpreter."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
