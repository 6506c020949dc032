"""The bench scripts run as `python bench/NAME.py`, which puts bench/ first on sys.path. bench/kernels.py (the
benchmark issue 3 names) then shadows Hugging Face's `kernels` package, which transformers 5 depends on and
imports: every script that loads a model died in transformers' import until each script moved bench/ to the end
of the path before importing anything that reaches transformers."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_transformers_imports_after_a_bench_script_starts(script, tmp_path):
    # as `python bench/NAME.py --help` starts (bench/ first, not the repository root, whose kernels/ folder is
    # installed as scaleserve.kernels for the same reason), then what a model load imports
    path = str(BENCH / script)
    code = (f"import runpy, sys\nsys.path[0] = {str(BENCH)!r}\nsys.argv = [{path!r}, '--help']\n"
            f"try:\n    runpy.run_path({path!r}, run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert e.code in (0, None), e.code\n"
            "import transformers.integrations.hub_kernels\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
