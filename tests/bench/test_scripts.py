"""The bench scripts run as `python bench/NAME.py`, which puts bench/ first on sys.path: a script named like an
installed package shadows it. transformers imports Hugging Face's `kernels` package when it is installed (it is a
dependency of transformers 5), and bench/kernels.py once took its place: every bench script that loads a model
failed at import."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_no_bench_script_is_named_like_an_installed_package():
    installed = importlib.metadata.packages_distributions()  # top-level module name -> distributions
    clashes = {p.stem: installed[p.stem] for p in BENCH.glob("*.py") if p.stem in installed}
    assert not clashes, f"bench scripts that shadow installed packages: {clashes}"


def test_transformers_imports_with_bench_first_on_the_path(tmp_path):
    # as `python bench/NAME.py` sees it: bench/ first, and not the repository root (whose kernels/ folder is
    # installed as scaleserve.kernels for the same reason)
    code = f"import sys; sys.path.insert(0, {str(BENCH)!r}); import transformers.integrations.hub_kernels"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
