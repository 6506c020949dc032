#!/usr/bin/env bash
# Download the server's Python dependencies that the GPU image lacks, as wheels for Python 3.12 on
# manylinux x86_64, into .carry/wheels (git-ignored). The GPU machine has no package registry, so the
# wheels travel with the working tree (`run` with carry: [".carry/wheels"]) and install from there:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/wheels/*.whl &&
#   python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . &&
#   export PYTHONPATH=/tmp/site && PYTHONUNBUFFERED=1 python3 bench/serve.py gpu --out $OUT
#
# Versions: those of the local venv (what the tests ran with), so both sides run the same code.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=.carry/wheels
mkdir -p "$DEST"
# fastapi + its server stack; the GPU image already has anyio, h11, httpx, click, prometheus-client.
NAMES="fastapi starlette uvicorn pydantic pydantic_core pydantic-settings python-dotenv annotated-types
typing-inspection typing_extensions annotated-doc python-multipart opentelemetry-api uvloop httptools
py-spy"  # py-spy: bench/serve.py --py-spy (where the server's host time goes)
SPECS=""
for n in $NAMES; do
  # the local version where installed (py-spy is only in the `bench` extra), else the newest
  if v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$n" 2>/dev/null); then
    SPECS="$SPECS $n==$v"
  else
    SPECS="$SPECS $n"
  fi
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" $SPECS
ls -la "$DEST"
du -sh "$DEST"
