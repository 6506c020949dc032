"""Kernel tests run the Triton kernels under the interpreter when there is no GPU.

TRITON_INTERPRET is read when triton is first imported, so it is set here, before any test
module of this folder imports triton (test modules also set it themselves for standalone runs).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def offline_compile():
    """run(script, cases) -> the script's last stdout line as JSON, one result per case: a Python script that
    compiles kernels for an NVIDIA target with Triton's bundled ptxas (no GPU), run without the interpreter in a
    process of its own, the cases as JSON on its stdin (with their inline asm they can pass argv's limit)."""
    pytest.importorskip("triton.backends.nvidia")

    def run(script: str, cases: list) -> list:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        done = subprocess.run([sys.executable, "-c", script], input=json.dumps(cases), env=env, capture_output=True,
                              text=True, timeout=580)
        assert done.returncode == 0, done.stderr[-3000:]
        found = json.loads(done.stdout.strip().splitlines()[-1])
        assert len(found) == len(cases)
        return found

    return run
