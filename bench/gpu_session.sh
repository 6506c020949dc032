#!/usr/bin/env bash
# Everything one GPU session runs, for the `device` tool (carry: .carry/wheels .carry/stories260K, and
# .carry/triton-cache.tgz when an earlier call brought one back: see below):
#   bash bench/gpu_session.sh setup|[tests] [kernel_tests] [e2e] [engine] [train] [serve] [adapters] [kernels]
#                             [kernels_smollm2] [profile] [pdl_ab] [mma_ab] [mma_candidates] [unroll_tests] [unroll_sweeps] [timing_check] [autotune_ab] [pins_ab] [rings] [m1_figures] [read_ceiling] [attn_tests] [attn_splits] [rope_ab] [fusion_ab] [norms_ab] [ablate] [ncu_gemv] [defaults_e2e] [lm_head_ab] [attn_decode] [attn_ab] [batch_tests] [mma_batch] [batch_decode] [fold_ab] [bounds] [norm_tests] [profile1] [tune] [alpha_ab] [alpha_batch_ab] [table_pairs_ab] [fold_planes_ab] [attn_configs] [zero_copy] [kernels_ab] [fold_swap_ab]
#                             results under $OUT
#   (each step has its own time limit; a device call runs at most 600 s, so split the steps over calls)
# The GPU image has torch/triton/transformers but not the server's web stack: bench/wheels.sh
# downloads those wheels here, and this script installs them into /tmp/site.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT" /tmp/ns/scaleserve
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .carry/wheels/*.whl
# Triton's compile cache travels between calls: a fresh machine otherwise spends minutes of device time
# compiling kernels that have not changed. Copy the last call's $OUT/triton-cache.tgz to
# .carry/triton-cache.tgz and carry it. It holds the compiled binaries and their metadata only (no IR,
# which Triton does not need to load a kernel, and no autotune picks, so every call still times its own
# configs). Triton keys each entry by source, options and target: a changed kernel compiles afresh.
export TRITON_CACHE_DIR=/tmp/triton-cache  # fixed: the cache's index files name absolute paths
mkdir -p "$TRITON_CACHE_DIR" && touch /tmp/session-start
[ -f .carry/triton-cache.tgz ] && tar -xzf .carry/triton-cache.tgz -C "$TRITON_CACHE_DIR"
pack_triton_cache() {  # $1: extra find tests (e.g. -newer FILE)
  (cd "$TRITON_CACHE_DIR" && find . -type f "$@" \( -name '*.cubin' -o -name '*.so' -o -name '*.json' \) \
     ! -name '*.autotune.json' -print0 | tar --null -czf "$OUT/triton-cache.tgz" -T -)
}
keep_triton_cache() {  # a file comes back from $OUT only up to 16 MiB: then keep what this call compiled
  pack_triton_cache
  [ "$(stat -c %s "$OUT/triton-cache.tgz")" -le $((16 << 20)) ] || pack_triton_cache -newer /tmp/session-start
  [ "$(stat -c %s "$OUT/triton-cache.tgz")" -le $((16 << 20)) ] || { rm -f "$OUT/triton-cache.tgz"; echo "triton cache over 16 MiB: not kept"; }
}
bundle_logs() {  # a call brings back only a few files from $OUT (8): the logs travel as one archive
  (cd "$OUT" && find . -name '*.log' -o -name device.txt | tar -czf logs.tgz -T - && find . \( -name '*.log' -o -name device.txt \) -delete)
}
trap 'keep_triton_cache; bundle_logs' EXIT
trap 'exit 143' TERM  # so a call wrapped in `timeout` still packs the cache (timeout signals the whole group)
link_base_tree() {  # the previous commit's tree (carried as .carry/base) as a second namespace package, /tmp/nsbase
  mkdir -p /tmp/nsbase/scaleserve
  for d in kernels server adapters; do ln -sfn "$PWD/.carry/base/$d" "/tmp/nsbase/scaleserve/$d"; done
}
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
    norm_tests)  # the MMA GEMV's RMSNorm epilogues (sums of squares included), its layouts, the model's fused-norm step
            timeout 300 python3 -m pytest -q -p no:cacheprovider --tb=short tests/kernels/test_int4_matmul.py -k norm \
              tests/kernels/test_int4_mma_gemv.py "tests/server/test_model.py::test_decode_with_the_norms_in_the_projections_matches_the_norm_kernels" \
              2>&1 | tee "$OUT/norm_tests.log" | tail -8 ;;
    profile1) timeout 300 python3 bench/decode_profile.py --presets llama2-7b --batches 1 --quantize-lm-head on \
                --json "$OUT/decode_profile1.json" 2>&1 | tee "$OUT/decode_profile1.log" | grep -B2 -A12 "^llama" ;;
    tune)  # the MMA GEMV's per-shape configs by timing the whole batch-1 decode graph (the device's pins)
          timeout ${TUNE_TIMEOUT:-330} python3 bench/tune_decode.py --quantize-lm-head ${TUNE_ARGS:-} \
            --json "$OUT/$(python3 -c "import re, torch; print(re.sub(r'[^A-Za-z0-9]+', '_', torch.cuda.get_device_name()).strip('_'))").json" \
            2>&1 | tee "$OUT/tune.log" | tail -12 ;;
    alpha_ab)  # the MMA alpha GEMV (mode 3, M = 1): its GPU tests, then against the CUDA-core plane GEMV and mode 2
              timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=short tests/kernels/test_int4_matmul.py \
                -k "mma_alpha_gemv" 2>&1 | tee "$OUT/alpha_tests.log" | tail -3
              for policy in auto never; do
                timeout 150 python3 bench/kernels.py --ms 1 --modes 2,3 --groups 128 --no-baselines \
                  --mma-alpha-policy $policy --json "$OUT/alpha-$policy.json" 2>&1 | tee "$OUT/alpha-$policy.log" \
                  | grep -E "^(qkv|o |gate_up|down)|layer"
              done ;;
    table_pairs_ab)  # the MMA alpha GEMV (mode 3, M = 1) with its tables read in row pairs one step ahead, and without
              for pairs in on off; do
                timeout 150 python3 bench/kernels.py --ms 1 --modes 3 --groups 128 --no-baselines \
                  --alpha-table-pairs $pairs --json "$OUT/table-pairs-$pairs.json" 2>&1 | tee "$OUT/table-pairs-$pairs.log" \
                  | grep -E "^(qkv|o |gate_up|down)|layer"
              done ;;
    attn_configs)  # the decode attention's BLOCK_N / warps / splits / merge warps inside the batch-1 7B graph, one process, in rounds
              # (ATTN_CONTEXT: the sequence's tokens; the serve bench's batch-1 run averages ~144)
              timeout ${ATTN_TIMEOUT:-300} python3 bench/decode_bounds.py --quantize-lm-head --context ${ATTN_CONTEXT:-144} \
                --variants "${ATTN_VARIANTS:-base,attn-n32,attn-n16,attn-w2,attn-w8,attn-s4,attn-s16,attn-n32-s8,attn-n16-s16,attn-m1,base}" \
                --json "$OUT/attn-configs.json" 2>&1 | tee "$OUT/attn_configs.log" | tail -14 ;;
    fold_planes_ab)  # the MMA alpha batch kernel with K_j in its plane operands: its GPU tests, then on / off, M = 4, 16
              timeout 200 python3 -m pytest -q -p no:cacheprovider --tb=short tests/kernels/test_int4_matmul.py \
                -k "fold_planes" 2>&1 | tee "$OUT/fold_planes_tests.log" | tail -3
              for fold in on off; do
                timeout 150 python3 bench/kernels.py --ms 4,16 --modes 3 --groups 128 --no-baselines \
                  --alpha-fold-planes $fold --json "$OUT/fold-planes-$fold.json" 2>&1 | tee "$OUT/fold-planes-$fold.log" \
                  | grep -E "^(qkv|o |gate_up|down)|layer"
              done ;;
    alpha_batch_ab)  # the MMA alpha batch kernel (mode 3, M = 4 and 16): its GPU tests, then against the tile and mode 2
              timeout 200 python3 -m pytest -q -p no:cacheprovider --tb=short tests/kernels/test_int4_matmul.py \
                -k "alpha_batch or table_pairs" 2>&1 | tee "$OUT/alpha_batch_tests.log" | tail -3
              for policy in auto never; do
                timeout 180 python3 bench/kernels.py --ms 4,16 --modes 2,3 --groups 128 --no-baselines \
                  --mma-batch-alpha-policy $policy --json "$OUT/alpha-batch-$policy.json" 2>&1 \
                  | tee "$OUT/alpha-batch-$policy.log" | grep -E "^(qkv|o |gate_up|down)|layer"
              done ;;
    bounds)  # the batch-1 decode graph with kernel families left out (timing only; BOUNDS_ARGS: more flags)
            timeout ${BOUNDS_TIMEOUT:-400} python3 bench/decode_bounds.py --quantize-lm-head ${BOUNDS_ARGS:-} \
              --json "$OUT/decode-bounds.json" 2>&1 | tee "$OUT/decode_bounds.log" | tail -14 ;;
    kernel_tests) timeout 300 python3 -m pytest -q -p no:cacheprovider --tb=short tests/kernels \
                    2>&1 | tee "$OUT/kernel_tests.log" | tail -15 ;;
    serve) timeout ${SERVE_TIMEOUT:-560} python3 bench/serve.py gpu --models ${SERVE_MODELS:-llama2-7b,smollm2-135m} ${SERVE_ARGS:-} \
             --out "$OUT/serve" 2>&1 | tee "$OUT/serve.log" | tail -12
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
    profile) timeout ${PROFILE_TIMEOUT:-300} python3 bench/decode_profile.py --presets ${PROFILE_PRESETS:-llama2-7b,smollm2-135m} \
               --batches ${PROFILE_BATCHES:-1,64} ${PROFILE_ARGS:-} --json "$OUT/decode_profile.json" 2>&1 \
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
    unroll_tests) timeout 240 python3 -m pytest -q -p no:cacheprovider --tb=short tests/kernels/test_int4_matmul.py \
                    -k "mma_gemv_small or mma_batch_small or llama7b_mma" 2>&1 | tee "$OUT/unroll_tests.log" | tail -3 ;;
    unroll_sweeps)  # the MMA GEMV (M = 1) and MMA batch kernel (M = 4) configs with their UNROLL 2 candidates, g128
                  timeout 280 python3 bench/kernels.py --ms 1 --modes ${SWEEP_MODES:-2} --groups 128 --mma-sweep \
                    --json "$OUT/mma-sweep.json" 2>&1 | tee "$OUT/mma-sweep.log" | grep -E "best|rror"
                  timeout 280 python3 bench/kernels.py --ms 4 --modes ${SWEEP_MODES:-2} --groups 128 --mma-batch-sweep \
                    --json "$OUT/mma-batch-sweep.json" 2>&1 | tee "$OUT/mma-batch-sweep.log" | grep -E "best|rror" ;;
    timing_check)  # does the autotuners' timing pick the MMA GEMV config that is fastest under graph replay?
                  timeout ${TIMING_TIMEOUT:-300} python3 bench/kernels.py --ms 1 --modes ${SWEEP_MODES:-2} --groups 128 --timing-check \
                    --json "$OUT/timing-check.json" 2>&1 | tee "$OUT/timing-check.log" | grep -E "picks|rror" ;;
    autotune_ab)  # batch-1 decode with the autotuners timing by do_bench, then by busy_bench (kernels/device.py).
                  # Triton keeps autotune picks on disk, so each run starts without them
                  for timing in ${AB_ARMS:-do_bench busy}; do
                    find "$TRITON_CACHE_DIR" -name '*.autotune.json' -delete
                    timeout ${AB_TIMEOUT:-150} python3 bench/decode_profile.py --presets llama2-7b --batches 1 \
                      --autotune-timing $timing --json "$OUT/decode_profile_$timing.json" 2>&1 \
                      | tee "$OUT/decode_profile_$timing.log" | grep -E "^llama|int4 gemv|picks"
                  done ;;
    pins_ab)  # batch-1 decode with the MMA GEMV autotuned, then pinned (PINS: a pins JSON; default timing_check's
              # graph-replay picks of the same call, so run timing_check first), in one process (NORMS_HEAD: int4 head)
              timeout ${AB_TIMEOUT:-200} python3 bench/decode_profile.py --presets llama2-7b --batches 1 \
                --mma-pins "${PINS:-$OUT/timing-check.json}" --pins off,on --quantize-lm-head ${NORMS_HEAD:-off} \
                --json "$OUT/decode_profile_pins.json" 2>&1 | tee "$OUT/decode_profile_pins.log" \
                | grep -E "^llama|int4 gemv|pins|picks" ;;
    rings)  # the MMA GEMV's cp.async rings (STAGES configs, the deep ones of session 18 among the candidates): every
            # listed and candidate config (SWEEP_MATCH: those whose label the regex matches) timed per 7B shape at
            # M = 1, g128 mode 2, then their GPU tests (RINGS_K: pytest -k)
            timeout ${SWEEP_TIMEOUT:-300} python3 bench/kernels.py --ms 1 --modes 2 --groups 128 --no-baselines \
              --mma-sweep ${SWEEP_MATCH:+--sweep-match "$SWEEP_MATCH"} --json "$OUT/mma-sweep-rings.json" 2>&1 \
              | tee "$OUT/mma-sweep-rings.log" | grep -E "best|rror"
            timeout ${RINGS_TESTS_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider --tb=short \
              tests/kernels/test_int4_matmul.py tests/kernels/test_int4_mma_gemv.py -k "${RINGS_K:-pipelined or layout}" 2>&1 \
              | tee "$OUT/rings_tests.log" | tail -3 ;;
    m1_figures) timeout 150 python3 bench/kernels.py --ms 1 --modes 1,2 --groups 128,-1 --no-baselines \
                  --json "$OUT/mma-auto.json" 2>&1 | tee "$OUT/mma-auto.log" | grep -E "^(qkv|o |gate_up|down)|layer"
                timeout 200 python3 bench/decode_profile.py --presets llama2-7b --batches 1 \
                  --json "$OUT/decode_profile.json" 2>&1 | tee "$OUT/decode_profile.log" | tail -25 ;;
    batch_tests|mma_batch)
               timeout 180 python3 -m pytest -q -p no:cacheprovider --tb=short tests/kernels/test_int4_mma_gemv.py \
                 tests/kernels/test_int4_matmul.py -k "batch or dispatch or autotuned" 2>&1 | tee "$OUT/batch_tests.log" | tail -4
               [ "$step" = batch_tests ] && continue
               for policy in all never; do  # the MMA batch kernel (M = 1 too) against the MMA GEMV / tensor-core tile
                 timeout 220 python3 bench/kernels.py --ms 1,4,16 --modes 2,1 --groups 128 --no-baselines \
                   --mma-batch-policy $policy --json "$OUT/batch-$policy.json" 2>&1 | tee "$OUT/batch-$policy.log" \
                   | grep -A12 "per Llama"
               done ;;
    batch_decode) timeout ${BATCH_DECODE_TIMEOUT:-240} python3 bench/decode_profile.py --presets llama2-7b --batches 4,16 --mma-batch on,off \
                    --json "$OUT/decode_profile_batch.json" 2>&1 | tee "$OUT/decode_profile_batch.log" \
                    | grep -A6 "mma-batch" ;;
    attn_decode)  # ATTN_CFG=BLOCK_N,WARPS,MIN_PARTITION skips the tests and the sweep; ATTN_BATCHES (1,16)
                 best=${ATTN_CFG:-}
                 if [ -z "$best" ]; then
                   timeout 100 python3 -m pytest -q -p no:cacheprovider --tb=short tests/kernels/test_attention.py 2>&1 \
                     | tee "$OUT/attn_tests.log" | tail -3
                   timeout 240 python3 bench/attention.py --sweep decode --json "$OUT/decode-sweep.json" 2>&1 \
                     | tee "$OUT/decode-sweep.log" | grep -E "config|failed"
                   best=$(python3 -c "import json; print(*json.load(open('$OUT/decode-sweep.json'))['best'], sep=',')")
                 fi
                 if [ -d .carry/base ]; then  # the previous commit's tree (carried): the same-call baseline
                   link_base_tree
                   (cd .carry/base && PYTHONPATH=/tmp/nsbase:/tmp/site timeout 150 python3 bench/decode_profile.py \
                      --presets llama2-7b --batches ${ATTN_BATCHES:-1,16} --json "$OUT/decode_profile_base.json" 2>&1 \
                      | tee "$OUT/decode_profile_base.log" | grep -E "^llama|_decode_kernel|reduce")
                 fi
                 timeout 150 python3 bench/decode_profile.py --presets llama2-7b --batches ${ATTN_BATCHES:-1,16} ${best:+--decode-attention $best} \
                   --json "$OUT/decode_profile_attn.json" 2>&1 | tee "$OUT/decode_profile_attn.log" \
                   | grep -E "^llama|_decode_kernel|reduce" ;;
    rope_ab)  # RoPE + KV write inside the decode attention kernel (DECODE_FUSED_ROPE): GPU tests, then decode off / on
              timeout 200 python3 -m pytest -q -p no:cacheprovider --tb=short tests/kernels/test_attention.py \
                tests/server/test_model.py tests/server/test_gpu_e2e.py -k "rope_kv or fused_rope or rtn-32" 2>&1 \
                | tee "$OUT/rope_tests.log" | tail -3
              timeout 240 python3 bench/decode_profile.py --presets llama2-7b --batches ${ROPE_BATCHES:-1,4} \
                --fused-rope off,on --json "$OUT/decode_profile_rope.json" 2>&1 | tee "$OUT/decode_profile_rope.log" \
                | grep -E "^llama|_decode_kernel|_rope_qk|reduce" ;;
    fusion_ab)  # batch-1 fusions: RoPE + KV write in the decode attention (DECODE_FUSED_ROPE), silu(gate) * up in the
                # gate / up GEMV's epilogue (FUSE_SILU_GATE): GPU tests, then decode at batch 1 with each off / on;
                # then MODE1_FROM_SLAB off / on (both fusions on, the int4 head)
                timeout 220 python3 -m pytest -q -p no:cacheprovider --tb=short tests/kernels/test_attention.py \
                  tests/kernels/test_int4_matmul.py tests/kernels/test_int4_mma_gemv.py tests/server/test_model.py \
                  tests/server/test_gpu_e2e.py -k "rope_kv or fused_rope or rtn-32 or silu or layout or mode1_rows or through_layer" 2>&1 \
                  | tee "$OUT/fusion_tests.log" | tail -3
                timeout 240 python3 bench/decode_profile.py --presets llama2-7b --batches 1 --fused-rope off,on \
                  --silu-gate off,on --json "$OUT/decode_profile_fusion.json" 2>&1 | tee "$OUT/decode_profile_fusion.log" \
                  | grep -E "^llama|_decode_kernel|_rope_qk|silu|int4 gemv"
                # with both on: mode 1 rows on the slab's 16-bit base slot off / on, with the int4 head
                timeout 150 python3 bench/decode_profile.py --presets llama2-7b --batches 1 --fused-rope on \
                  --silu-gate on --mode1-slab off,on --quantize-lm-head on --json "$OUT/decode_profile_mode1.json" 2>&1 \
                  | tee "$OUT/decode_profile_mode1.log" | grep -E "^llama|int4 gemv|lm_head" ;;
    defaults_e2e)  # the layer test of the fused RoPE, the GPU end-to-end tests, then batch-1 decode, on the defaults
                   timeout 60 python3 -m pytest -q -p no:cacheprovider --tb=short tests/server/test_model.py -k fused_rope \
                     2>&1 | tee "$OUT/layer_test.log" | tail -15
                   timeout ${E2E_TIMEOUT:-400} python3 -m pytest -q -p no:cacheprovider --tb=short --durations=8 \
                     tests/server/test_gpu_e2e.py ${E2E_K:+-k "$E2E_K"} 2>&1 | tee "$OUT/gpu_e2e.log" | tail -25
                   [ "${E2E_DECODE:-1}" = 1 ] && timeout 100 python3 bench/decode_profile.py --presets llama2-7b --batches 1 \
                     --json "$OUT/decode_profile_defaults.json" 2>&1 | tee "$OUT/decode_profile_defaults.log" \
                     | grep -E "^llama|int4 gemv|_decode_kernel" ;;
    norms_ab)  # each RMSNorm inside the MMA GEMVs around it (FUSE_NORMS): the GPU tests, then batch-1 decode off / on,
               # with the bf16 head and (NORMS_HEAD=on,off) the int4 head
              timeout ${NORMS_TESTS_TIMEOUT:-170} python3 -m pytest -q -p no:cacheprovider --tb=short tests/kernels/test_int4_matmul.py \
                tests/server/test_model.py -k "${NORMS_K:-norm or silu or fused_rope}" 2>&1 | tee "$OUT/norms_tests.log" | tail -4
              timeout ${AB_TIMEOUT:-300} python3 bench/decode_profile.py --presets llama2-7b --batches 1 --fused-norms off,on \
                --quantize-lm-head ${NORMS_HEAD:-off} --json "$OUT/decode_profile_norms.json" 2>&1 \
                | tee "$OUT/decode_profile_norms.log" | grep -E "^llama|int4 gemv|norm|lm_head" ;;
    ablate)  # batch-1 decode (int4 head) on MMA GEMV configs pinned to the step's picks, with the switches of
             # bench/decode_profile.py named in ABLATE on, each off alone, then all off: one process, so the runs
             # compare (session 18 ablated four latency changes this way; two calls agreed within 8 µs a step)
              timeout ${AB_TIMEOUT:-300} python3 bench/decode_profile.py --presets llama2-7b --batches 1 --quantize-lm-head on \
                --ablate ${ABLATE:?name the switches} --mma-pins ${PINS:-bench/results/mma-pins-step-s17-h100.json} \
                --json "$OUT/decode_profile_ablate.json" 2>&1 | tee "$OUT/decode_profile_ablate.log" \
                | grep -E "^llama|int4 gemv|_decode|reduce" ;;
    ncu_gemv)  # Nsight Compute on the MMA GEMV, the four 7B shapes at the decode step's configs (bench/ncu_gemv.py)
              ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
              stalls=$(printf 'smsp__average_warps_issue_stalled_%s_per_issue_active.ratio,' long_scoreboard short_scoreboard \
                wait math_pipe_throttle mio_throttle lg_throttle barrier not_selected selected dispatch_stall \
                no_instruction branch_resolving drain imc_miss membar sleeping tex_throttle)
              timeout ${NCU_TIMEOUT:-240} "$ncu_bin" --clock-control none -k regex:_mma_gemv_kernel --launch-count 16 \
                --section SpeedOfLight --section Occupancy --section SchedulerStats --section WarpStateStats \
                --section MemoryWorkloadAnalysis --section LaunchStats --metrics "${stalls%,}" --csv --page details \
                python3 bench/ncu_gemv.py > "$OUT/ncu_gemv.csv" 2> "$OUT/ncu_gemv.log"
              tail -3 "$OUT/ncu_gemv.log"; python3 bench/ncu_gemv.py --summarize "$OUT/ncu_gemv.csv" ;;
    lm_head_ab)  # the output projection in int4 (the MMA GEMV) against bf16 cuBLAS, batch 1
                timeout 200 python3 bench/decode_profile.py --presets llama2-7b --batches 1 --quantize-lm-head off,on \
                  --json "$OUT/decode_profile_lm_head.json" 2>&1 | tee "$OUT/decode_profile_lm_head.log" \
                  | grep -E "^llama|lm_head|int4 gemv" ;;
    attn_splits) timeout 120 python3 bench/attention.py --sweep splits --json "$OUT/split-sweep.json" 2>&1 \
                   | tee "$OUT/split-sweep.log" | tail -45 ;;
    attn_tests) timeout 100 python3 -m pytest -q -p no:cacheprovider --tb=short tests/kernels/test_attention.py 2>&1 \
                  | tee "$OUT/attn_tests.log" | tail -3 ;;
    attn_ab)  # bench/attention.py on this tree's kernels and on the previous commit's (carried as .carry/base)
              link_base_tree
              for tree in base new; do
                ns=/tmp/ns; [ $tree = base ] && ns=/tmp/nsbase
                PYTHONPATH=$ns:/tmp/site timeout 100 python3 bench/attention.py --json "$OUT/attn-$tree.json" 2>&1 \
                  | tee "$OUT/attn-$tree.log" | grep " paged"
              done ;;
    kernels_ab)  # bench/kernels.py (KAB_ARGS) on the previous commit's kernels (carried as .carry/base), then on
                 # this tree's, then both again (KAB_ROUNDS, default 2): an A/B whose order shows the drift; first
                 # the GPU tests of tests/kernels/test_int4_matmul.py matching KAB_K (default: the fold GEMM's)
      timeout 120 python3 -m pytest -q -p no:cacheprovider --tb=short tests/kernels/test_int4_matmul.py \
        -k "${KAB_K:-fold}" 2>&1 | tee "$OUT/kab_tests.log" | tail -4
      link_base_tree
      for round in $(seq ${KAB_ROUNDS:-2}); do
        for tree in base new; do
          ns=/tmp/ns; [ $tree = base ] && ns=/tmp/nsbase
          PYTHONPATH=$ns:/tmp/site timeout ${KAB_TIMEOUT:-150} python3 bench/kernels.py ${KAB_ARGS:-} \
            --json "$OUT/kab-$tree-$round.json" 2>&1 | tee "$OUT/kab-$tree-$round.log" | grep -A12 "per Llama"
        done
      done ;;
    read_ceiling) timeout 90 python3 bench/access_pattern.py --match 'pdl|regs BN 16 w4 d[12]$|stream x2/SM s4$|copy' \
                    --json "$OUT/access-pdl.json" 2>&1 | tee "$OUT/access-pdl.log" | tail -30 ;;
    fold_swap_ab)  # the fold GEMM with the code bytes as the MMA's A operand (FOLD_SWAP) and mode 2's one-slot loop
                   # (FOLD_ONE_SLOT): their GPU tests (skipped with FSW_TESTS=0), then M in FSW_MS (default 64,128,256)
                   # in modes 1 / 2, one adapter, per arm of FSW_ARMS (base: both off, as shipped; one: FOLD_ONE_SLOT;
                   # swap: both on; swap-all: both on and every M >= 2 sent to the fold GEMM, for FSW_MS=4,16),
                   # FSW_ROUNDS rounds (default 1) in turn, so a second round shows the drift (FSW_ARGS: more flags)
      [ "${FSW_TESTS:-1}" = 0 ] || timeout ${FSW_TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider --tb=short \
        tests/kernels/test_int4_matmul.py -k "swap or one_slot" 2>&1 | tee "$OUT/fold_swap_tests.log" | tail -4
      for round in $(seq ${FSW_ROUNDS:-1}); do
        for arm in ${FSW_ARMS:-base one swap}; do
          case $arm in base) flags="--fold-one-slot off --fold-swap off" ;; one) flags="--fold-one-slot on --fold-swap off" ;;
                       swap) flags="--fold-one-slot on --fold-swap on" ;;
                       swap-all) flags="--fold-one-slot on --fold-swap on --fold-policy always --mma-batch-policy never" ;;
                       *) echo "unknown arm $arm" >&2; continue ;; esac
          timeout ${FSW_TIMEOUT:-200} python3 bench/kernels.py --ms ${FSW_MS:-64,128,256} --modes 1,2 --groups 128 --no-baselines \
            --t1-only $flags ${FSW_ARGS:-} --json "$OUT/fold-swap-$arm-$round.json" 2>&1 \
            | tee "$OUT/fold-swap-$arm-$round.log" | grep -A12 "per Llama"
        done
      done ;;
    fold_ab) for policy in always never; do  # the fold GEMM against the per-row tile, M >= 64, same call
               timeout 200 python3 bench/kernels.py --ms 64,128,256 --modes 1,2 --groups 128,-1 --no-baselines \
                 --fold-policy $policy --json "$OUT/fold-$policy.json" 2>&1 | tee "$OUT/fold-$policy.log" \
                 | grep -A16 "per Llama"
             done ;;
    e2e) timeout ${E2E_TIMEOUT:-480} python3 -m pytest -q -p no:cacheprovider --tb=short -x --durations=8 tests/server/test_gpu_e2e.py ${E2E_K:+-k "$E2E_K"} \
           2>&1 | tee "$OUT/gpu_e2e.log" | tail -40 ;;
    engine) timeout ${ENGINE_TIMEOUT:-560} python3 -m pytest -q -p no:cacheprovider --tb=short -x --durations=5 -m gpu \
              -k "${ENGINE_K:-}" tests/server/test_staging.py tests/server/test_engine.py 2>&1 | tee "$OUT/engine_tests.log" | tail -20 ;;
    zero_copy)  # decode graphs that fetch their inputs and send their tokens home themselves (kernels/host_copy.py):
                # the GPU tests (a failure leaves $OUT/zero_copy_failed), then the batch-1 7B graph against the copy
                # engine's upload and copy home (`ops`) at ZC_CONTEXT tokens, with the 4-split attention and without
                # (ZC_VARIANTS: other decode_bounds variants; ZC_ARGS: more of its flags)
      { timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=short tests/kernels/test_host_copy.py \
          "tests/kernels/test_fused.py" -k "host_copy or pinned or fetch or send_home or bad_buffers or embed or argmax or norms_in" \
          "tests/server/test_model.py::test_decode_with_the_norms_in_the_projections_matches_the_norm_kernels" 2>&1 \
          && timeout 200 python3 -m pytest -q -p no:cacheprovider --tb=short -x -m gpu tests/server/test_engine.py \
               -k "cuda_graph_steps_equal_eager or gpu_step_timing" 2>&1; } | tee "$OUT/zero_copy_tests.log" | tail -8
      [ "${PIPESTATUS[0]}" = 0 ] || { touch "$OUT/zero_copy_failed"; continue; }
      timeout ${ZC_TIMEOUT:-200} python3 bench/decode_bounds.py --quantize-lm-head --context ${ZC_CONTEXT:-144} \
        --variants "${ZC_VARIANTS:-base,ops,attn-s4,attn-s4+ops,base}" ${ZC_ARGS:-} --json "$OUT/zero-copy.json" 2>&1 \
        | tee "$OUT/zero_copy.log" | tail -8 ;;
    setup) ;;  # the install above, for a command that runs its own steps after it
    *) echo "unknown step $step" ;;
  esac
done
