"""Kernel tests run the Triton kernels under the interpreter when there is no GPU.

TRITON_INTERPRET is read when triton is first imported, so it is set here, before any test
module of this folder imports triton (test modules also set it themselves for standalone runs).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
