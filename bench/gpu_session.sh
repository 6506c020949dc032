#!/usr/bin/env bash
# Everything one GPU session runs, for the `device` tool (carry: .carry/wheels .carry/stories260K):
#   bash bench/gpu_session.sh setup|[tests] [kernel_tests] [e2e] [engine] [train] [serve] [adapters] [kernels]
#                             [kernels_smollm2] [profile] [pdl_ab] [mma_ab] [mma_candidates] [m1_figures] [read_ceiling] [mma_batch] [batch_decode] [fold_ab]
#                             results under $OUT
#   (each step has its own time limit; a device call runs at most 600 s, so split the steps over calls)
# The GPU image has torch/triton/transformers but not the server's web stack: bench/wheels.sh
# downloads those wheels here, and this script installs them into /tmp/site.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT" /tmp/ns/scaleserve
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/wheels/*.whl
for d in kernels server adapters; do ln -sfn "$PWD/$d" "/tmp/ns/scaleserve/$d"; done  # namespace package
export PYTHONPATH=/tmp/ns:/tmp/site PYTHONUNBUFFERED=1 SCALESERVE_STORIES260K=$PWD/.carry/stories260K
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
steps=("$@")
[ ${#steps[@]} -gt 0 ] || { echo "name the steps to run (setup alone only installs)" >&2; exit 2; }
for step in "${steps[@]}"; do
  case $step in
    tests) timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_fused.py tests/server/test_gpu_e2e.py \
             2>&1 | tee "$OUT/gpu_tests.log" | tail -15 ;;
    kernel_tests) timeout 300 python3 -m pytest -q -p no:cacheprovider --tb=short tests/kernels \
                    2>&1 | tee "$OUT/kernel_tests.log" | tail -15 ;;
    serve) timeout 560 python3 bench/serve.py gpu --out "$OUT/serve" 2>&1 | tee "$OUT/serve.log" | tail -12
           cp /tmp/scaleserve-bench/*-server.log "$OUT/serve/" ;;
    adapters) timeout 420 python3 bench/adapters.py --device cuda --json "$OUT/adapters.json" 2>&1 \
                | tee "$OUT/adapters.log" | tail -12 ;;
    kernels) timeout 480 python3 bench/kernels.py --ms 4,16,64,256 --merge bench/kernels-h100.json \
               --json "$OUT/kernels.json" --png "$OUT/kernels.png" 2>&1 | tee "$OUT/kernels.log" | tail -30 ;;
    kernels_smollm2) timeout 150 python3 bench/kernels.py --shapes sm_qkv,sm_o,sm_gate_up,sm_down --groups 32 \
                       --modes 1,2 --ms 1,16,64 --json "$OUT/kernels-smollm2.json" 2>&1 \
                       | tee "$OUT/kernels_smollm2.log" | tail -20 ;;
    train) timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/adapters/test_train.py \
             2>&1 | tee "$OUT/train_tests.log" | tail -8 ;;
    profile) timeout 300 python3 bench/decode_profile.py --batches 1,64 --json "$OUT/decode_profile.json" 2>&1 \
               | tee "$OUT/decode_profile.log" | tail -40 ;;
    pdl_ab) timeout 300 python3 bench/decode_profile.py --presets llama2-7b --batches 1 --pdl off,on \
              --json "$OUT/decode_profile_pdl.json" 2>&1 | tee "$OUT/decode_profile_pdl.log" | grep -A12 " pdl " ;;
    mma_ab) for policy in auto never; do  # the MMA GEMV against the CUDA-core GEMV per shape, M = 1, same call
              timeout 150 python3 bench/kernels.py --ms 1 --modes 1,2 --groups 128,-1 --no-baselines \
                --mma-policy $policy --json "$OUT/mma-$policy.json" 2>&1 | tee "$OUT/mma-$policy.log" \
                | grep -E "^(qkv|o |gate_up|down)"
            done ;;
    mma_candidates) timeout 90 python3 -m pytest -q -p no:cacheprovider --tb=short tests/kernels/test_int4_mma_gemv.py \
                      tests/kernels/test_int4_matmul.py -k "mma or dispatch" 2>&1 | tee "$OUT/mma_tests.log" | tail -3
                    timeout 240 python3 bench/kernels.py --ms 1 --modes 2,1 --groups 128 --mma-sweep \
                      --json "$OUT/mma-sweep.json" 2>&1 | tee "$OUT/mma-sweep.log" | grep -E "best|rror"
                    timeout 120 python3 bench/access_pattern.py --json "$OUT/access.json" 2>&1 \
                      | tee "$OUT/access.log" | tail -60 ;;
    m1_figures) timeout 150 python3 bench/kernels.py --ms 1 --modes 1,2 --groups 128,-1 --no-baselines \
                  --json "$OUT/mma-auto.json" 2>&1 | tee "$OUT/mma-auto.log" | grep -E "^(qkv|o |gate_up|down)|layer"
                timeout 200 python3 bench/decode_profile.py --presets llama2-7b --batches 1 \
                  --json "$OUT/decode_profile.json" 2>&1 | tee "$OUT/decode_profile.log" | tail -25 ;;
    mma_batch) timeout 120 python3 -m pytest -q -p no:cacheprovider --tb=short tests/kernels/test_int4_mma_gemv.py \
                 tests/kernels/test_int4_matmul.py -k "batch or dispatch or autotuned" 2>&1 | tee "$OUT/batch_tests.log" | tail -4
               for policy in all never; do  # the MMA batch kernel (M = 1 too) against the MMA GEMV / tensor-core tile
                 timeout 220 python3 bench/kernels.py --ms 1,4,16 --modes 2,1 --groups 128 --no-baselines \
                   --mma-batch-policy $policy --json "$OUT/batch-$policy.json" 2>&1 | tee "$OUT/batch-$policy.log" \
                   | grep -A12 "per Llama"
               done ;;
    batch_decode) timeout 240 python3 bench/decode_profile.py --presets llama2-7b --batches 4,16 --mma-batch on,off \
                    --json "$OUT/decode_profile_batch.json" 2>&1 | tee "$OUT/decode_profile_batch.log" \
                    | grep -A6 "mma-batch" ;;
    read_ceiling) timeout 90 python3 bench/access_pattern.py --match 'pdl|regs BN 16 w4 d[12]$|stream x2/SM s4$|copy' \
                    --json "$OUT/access-pdl.json" 2>&1 | tee "$OUT/access-pdl.log" | tail -30 ;;
    fold_ab) for policy in always never; do  # the fold GEMM against the per-row tile, M >= 64, same call
               timeout 200 python3 bench/kernels.py --ms 64,128,256 --modes 1,2 --groups 128,-1 --no-baselines \
                 --fold-policy $policy --json "$OUT/fold-$policy.json" 2>&1 | tee "$OUT/fold-$policy.log" \
                 | grep -A16 "per Llama"
             done ;;
    e2e) timeout 300 python3 -m pytest -q -p no:cacheprovider --tb=short -x --durations=8 tests/server/test_gpu_e2e.py \
           2>&1 | tee "$OUT/gpu_e2e.log" | tail -40 ;;
    engine) timeout 560 python3 -m pytest -q -p no:cacheprovider --tb=short -x --durations=5 -m gpu \
              tests/server/test_engine.py 2>&1 | tee "$OUT/engine_tests.log" | tail -20 ;;
    setup) ;;  # the install above, for a command that runs its own steps after it
    *) echo "unknown step $step" ;;
  esac
done
