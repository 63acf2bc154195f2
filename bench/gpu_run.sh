#!/usr/bin/env bash
# The GPU checks and benchmarks, from the repo root, in one or more device calls of < 10 minutes each:
#
#     OUT=/some/dir bash bench/gpu_run.sh [STAGE ...]     # default: every stage (more than one call's worth)
#
# Stages: versions pytest exact kernel train step-0.5b step-7b step-7b-long profile-7b exact-seeds train-1m long-7b long-0.5b recheck recheck-step recheck-kernel recheck-1m offload-tests exact-offload offload-speed offload-speed-7b offload-growth plan-check offload-4m offload-7b-1m sparse-tests sparse-fid-train sparse-fidelity sparse-curves sparse-speed sparse-profile sparse-7b sparse-train-1m copy-probe sparse-offload-tests sparse-offload-speed sparse-offload-7b sparse-offload-growth sparse-offload-train sparse-offload-7b-1m sparse-offload-4m wgrad-probe sweep-7b sweep-long ncu-probe hf-baseline
#
# Each stage runs under its own `timeout`, so a hang in one cannot eat the budget of the call; name stages whose
# limits fit one call (10 minutes). They cover versions, GPU tests, gradient exactness, training-step benchmarks
# (0.5B, 7B), the HF-transformers anchors (if shared/bench/hf_baseline.py was copied into the repo), kernel
# benchmarks and sweeps, offload and sparse attention, and default train.py runs. Stage output goes to $OUT/log.txt; stdout gets one status line per stage and a summary at the end.
#
# Files under $OUT: bench.jsonl (bench.py, one JSON object per point), anchors.jsonl (hf_baseline.py), log.txt,
# pytest.txt, train.txt, train_log.jsonl.
set -u
cd "$(dirname "$0")/.."

OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0  # compiled kernels (tests/test_paged_attention.py defaults to the interpreter otherwise)
export PY=${PYTHON:-python3}
LOG=$OUT/log.txt
START=$SECONDS
STATUS=()

# stage NAME LIMIT_S COMMAND...: run COMMAND under `timeout`, its output appended to log.txt
stage() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS rc
    echo "=== [$name] $(date -u +%H:%M:%S) limit ${limit}s: $*" >>"$LOG"
    timeout -k 3 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    local note=""
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then note=" TIMEOUT"; fi
    echo "=== [$name] rc=$rc$note ($((SECONDS - t0)) s)" >>"$LOG"
    STATUS+=("$(printf '%-14s rc=%-3s %4s s%s' "$name" "$rc" "$((SECONDS - t0))" "$note")")
    echo "[$name] rc=$rc$note ($((SECONDS - t0)) s, total $((SECONDS - START)) s)"
}


want() {  # is stage $1 selected on the command line (or are all)?
    [ ${#SELECTED[@]} -eq 0 ] && return 0
    local s
    for s in "${SELECTED[@]}"; do [ "$s" = "$1" ] && return 0; done
    return 1
}
SELECTED=("$@")

want versions && stage versions 15 bash -c "nvidia-smi; $PY -c '
import importlib, torch, triton
print(\"torch\", torch.__version__, \"| triton\", triton.__version__, \"| cuda\", torch.version.cuda,
      \"|\", torch.cuda.get_device_name() if torch.cuda.is_available() else \"NO CUDA\")
for m in (\"numpy\", \"tqdm\", \"safetensors\", \"pytest\", \"transformers\"):
    try:
        importlib.import_module(m)
    except Exception as e:
        print(\"missing:\", m, e)
'"

# GPU tests: the compiled kernels against their references, and chunked training against full-sequence autograd
want pytest && stage pytest 330 bash -c "$PY -m pytest -q tests/test_paged_attention.py tests/test_paged_kv.py \
    tests/test_chunk_train.py tests/test_model.py tests/test_layer_ops.py >'$OUT/pytest.txt' 2>&1; rc=\$?; tail -30 '$OUT/pytest.txt'; exit \$rc"

# exactness: chunked bf16 gradients vs an fp32 full-sequence reference, head_dim 64 and 128
want exact && stage exact 90 "$PY" bench.py exact --model small,small-d128 --seq 4096 --chunk 1024 --page-size 64 \
    --time-budget 80

# kernel: paged attention vs SDPA, Qwen2.5-7B heads, page sizes 64 and 128
want kernel && stage kernel 100 "$PY" bench.py kernel --lengths 16384,32768,65536 --page-size 64,128 --chunk 4096 \
    --heads 28 --kv-heads 4 --head-dim 128 --warmup 1 --repeats 5 --time-budget 90

# the default training run on the GPU (small preset)
if want train; then
    rm -rf /tmp/run
    stage train 120 bash -c "$PY train.py --steps 300 --out /tmp/run >'$OUT/train.txt' 2>&1; rc=\$?; tail -c 3000 '$OUT/train.txt' | tr '\r' '\n' | tail -4; exit \$rc"
    [ -f /tmp/run/log.jsonl ] && cp /tmp/run/log.jsonl "$OUT/train_log.jsonl"
fi

# training step: chunked vs the full-sequence baseline (expandable segments: the pools vary in size per point)
want step-0.5b && stage step-0.5b 140 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    "$PY" bench.py step --model qwen2.5-0.5b --lengths 16384,32768,65536,131072,262144 --chunk 4096 \
    --page-size 64 --warmup 1 --repeats 2 --point-budget 30 --time-budget 130
want step-7b && stage step-7b 100 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    "$PY" bench.py step --model qwen2.5-7b --params-dtype bfloat16 --lengths ${LENGTHS_7B:-16384,32768} \
    --chunk ${CHUNK:-2048} --page-size 64 --output-cache ${OUTPUT_CACHE:-0} --warmup 1 --repeats 2 --point-budget 20 \
    --time-budget 90
# longer 7B: layers recomputed inside each chunk, so activations stay ~1 GiB and the pool gets the memory
want step-7b-long && stage step-7b-long 170 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    "$PY" bench.py step --model qwen2.5-7b --params-dtype bfloat16 --lengths 65536,131072 --checkpoint \
    --chunk 2048 --page-size 64 --warmup 1 --repeats 1 --point-budget 20 --time-budget 160 --no-baseline

# where a 7B step's GPU time goes (one chunked and one baseline step at 16K, profiled)
want profile-7b && stage profile-7b 120 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    "$PY" bench.py step --model qwen2.5-7b --params-dtype bfloat16 --lengths 16384 --chunk ${CHUNK:-2048} \
    --page-size 64 --warmup 1 --repeats 2 --profile ${ROWS:-30} --time-budget 110
# what folding bf16 weight gradients into fp32 main_grad costs, split vs fused into the GEMM (7B shapes)
want wgrad-probe && stage wgrad-probe 60 "$PY" bench/wgrad_probe.py

# tile sweep on the 7B 16K step's attention calls: a 4096-query chunk after 0, 4K, 8K and 12K of history, page 64
want sweep-7b && stage sweep-7b 540 env H=28 HKV=4 D=128 KINDS="${KINDS:-fwd,dq,dkdv}" GRID="${GRID:-{\}}" \
    CASES='[[4096,4096,64],[8192,4096,64],[12288,4096,64],[16384,4096,64]]' \
    "$PY" bench/sweep_tiles.py "${SWEEP_BUDGET:-500}"

# a few configurations on a long history (what a million-token step spends its time on): 4096 queries after 60K
want sweep-long && stage sweep-long 300 env H=28 HKV=4 D=128 KINDS="${KINDS:-fwd,dq,dkdv}" GRID="${GRID:-{\}}" \
    CASES='[[65536,4096,64]]' "$PY" bench/sweep_tiles.py "${SWEEP_BUDGET:-250}"
# Nsight Compute on each kernel of one 7B-shaped call (4096 queries after 12K): throughputs, pipes, spills
want ncu-probe && stage ncu-probe 120 bash -c "ncu --clock-control none --section SpeedOfLight \
    --section ComputeWorkloadAnalysis --section WarpStateStats --section MemoryWorkloadAnalysis --launch-skip 3 \
    --launch-count 3 -k 'regex:_(fwd|dq|dkdv)_kernel' $PY bench/ncu_probe.py >'$OUT/ncu.txt' 2>&1; rc=\$?; \
    grep -E '_kernel|Duration|Throughput|highest-utilized|Spilling Requests ' '$OUT/ncu.txt'; exit \$rc"
# exactness over several seeds: is chunked bf16 vs full bf16 (ratio of errors to fp32) above 1 beyond noise?
want exact-seeds && stage exact-seeds 120 bash -c 'for seed in 1 2 3 4; do '"$PY"' bench.py exact \
    --model small-d128 --seq 4096 --chunk 1024 --page-size 64 --seed $seed || exit 1; done'

# the headline command: the default model on a million-token sequence (dense exact attention), one step
if want train-1m; then
    rm -rf /tmp/run1m
    stage train-1m 250 bash -c "$PY train.py --seq 1000000 --steps 1 --out /tmp/run1m >'$OUT/train1m.txt' 2>&1; rc=\$?; tail -c 3000 '$OUT/train1m.txt' | tr '\r' '\n' | grep -v '^ *$' | tail -4; exit \$rc"
    [ -f /tmp/run1m/log.jsonl ] && cp /tmp/run1m/log.jsonl "$OUT/train1m_log.jsonl"
fi
# the longest lengths measured on the GPU alone (one step each, kernels already compiled by earlier points)
want long-7b && stage long-7b 110 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    "$PY" bench.py step --model qwen2.5-7b --params-dtype bfloat16 --lengths 131072 --checkpoint --chunk 2048 \
    --page-size 64 --warmup 0 --repeats 1 --no-baseline
want long-0.5b && stage long-0.5b 210 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    "$PY" bench.py step --model qwen2.5-0.5b --lengths 524288 --chunk 4096 --page-size 64 --warmup 0 --repeats 1 \
    --no-baseline

# after a kernel change: the kernel (page 64), exactness at head_dim 128, and the 7B step at 16K/32K
want recheck && stage recheck 240 bash -c '"$PY" bench.py kernel --lengths 16384,32768,65536 --page-size 64 \
    --chunk 4096 && "$PY" bench.py exact --model small-d128 --seq 4096 --chunk 1024 --page-size 64 && \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "$PY" bench.py step --model qwen2.5-7b --params-dtype bfloat16 \
    --lengths 16384,32768 --chunk 2048 --page-size 64 --repeats 2'

# after a change to the chunked step: its GPU tests, then 0.5B and 7B steps at 16K/32K
want recheck-step && stage recheck-step 280 bash -c '"$PY" -m pytest -q -x tests/test_paged_kv.py \
    tests/test_chunk_train.py && export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True && \
    "$PY" bench.py step --model qwen2.5-0.5b --lengths 16384,32768 --chunk 4096 --page-size 64 --no-baseline && \
    "$PY" bench.py step --model qwen2.5-7b --params-dtype bfloat16 --lengths 16384,32768 --chunk 2048 \
    --page-size 64 --no-baseline'

# after a kernel refactor: compiled-kernel tests and the kernel benchmark (page 64)
want recheck-kernel && stage recheck-kernel 280 bash -c '"$PY" -m pytest -q -x tests/test_paged_attention.py \
    tests/test_paged_kv.py tests/test_chunk_train.py && "$PY" bench.py kernel --lengths 16384,32768 --page-size 64 \
    --chunk 4096'

# after a kernel config change for head_dim 64: compiled-kernel tests, then the 1M-token default run
if want recheck-1m; then
    stage recheck-1m-tests 150 "$PY" -m pytest -q -x tests/test_paged_attention.py tests/test_chunk_train.py
    rm -rf /tmp/run1m
    stage train-1m 250 bash -c "$PY train.py --seq 1000000 --steps 1 --out /tmp/run1m >'$OUT/train1m.txt' 2>&1; rc=\$?; tail -c 3000 '$OUT/train1m.txt' | tr '\r' '\n' | grep -v '^ *$' | tail -3; exit \$rc"
fi

# --- offload (offload.py): GPU tests on real copy streams, exactness, speed vs in-GPU pages, memory vs length
want offload-tests && stage offload-tests 70 bash -c "$PY -m pytest -q tests/test_offload.py \
    tests/test_paged_attention.py -k 'offload or split' >'$OUT/pytest_offload.txt' 2>&1; rc=\$?; \
    tail -5 '$OUT/pytest_offload.txt'; exit \$rc"
want exact-offload && stage exact-offload 90 "$PY" bench.py exact --model small,small-d128 --seq 16384 \
    --chunk 1024 --page-size 64 --batch 1
want offload-speed && stage offload-speed 240 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    "$PY" bench.py step --model qwen2.5-0.5b --lengths ${LENGTHS_05B:-32768,131072} --chunk 4096 --page-size 64 \
    --stores paged,offload --warmup 1 --repeats 2 --no-baseline ${PROFILE:+--profile $PROFILE}
want offload-speed-7b && stage offload-speed-7b 200 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    "$PY" bench.py step --model qwen2.5-7b --params-dtype bfloat16 --lengths 32768 --chunk 4096 --checkpoint \
    --page-size 64 --stores paged,offload --warmup 1 --repeats ${REPEATS:-1} --no-baseline
# peak GPU memory vs length with offload: whole steps up to 128K, then probes (random history + the last chunk)
want offload-growth && stage offload-growth 150 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    "$PY" bench.py step --model qwen2.5-0.5b --lengths 65536,262144,524288,1048576 --chunk 4096 --page-size 64 \
    --stores offload --last-chunks 1 --warmup 0 --repeats 1
# the planner against train.py's measured peak (0.5B, AdamW, 128K tokens, pages offloaded)
if want plan-check; then
    rm -rf /tmp/runplan
    stage plan-check 100 bash -c "$PY train.py --model qwen2.5-0.5b --seq 131072 --offload on --steps 1 \
        --eval-iters 1 --host-memory 100 --out /tmp/runplan --plan && $PY train.py --model qwen2.5-0.5b \
        --seq 131072 --offload on --steps 1 --eval-iters 1 --host-memory 100 --out /tmp/runplan 2>&1 | \
        tr '\r' '\n' | grep -E '^(model|done|error)'; cat /tmp/runplan/log.jsonl"
fi
# capacity: the longest lengths, as probes (a whole dense step at these lengths takes 30-60 min)
want offload-4m && stage offload-4m 280 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    "$PY" bench.py step --model qwen2.5-0.5b --lengths 4194304 --chunk 4096 --page-size 64 --stores offload \
    --grad-pages bfloat16 --last-chunks 1 --warmup 0 --repeats 1
want offload-7b-1m && stage offload-7b-1m 250 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    "$PY" bench.py step --model qwen2.5-7b --params-dtype bfloat16 --lengths 1048576 --chunk 4096 --checkpoint \
    --page-size 64 --stores offload --grad-pages bfloat16 --last-chunks 1 --warmup 0 --repeats 1

# --- sparse attention (sparse_attn.py): compiled-kernel tests, fidelity on a trained model, loss curves, speed
want sparse-tests && stage sparse-tests 300 bash -c "$PY -m pytest -q tests/test_sparse_attn.py \
    tests/test_paged_attention.py >'$OUT/pytest_sparse.txt' 2>&1; rc=\$?; tail -5 '$OUT/pytest_sparse.txt'; exit \$rc"
# fidelity needs a trained model (random weights attend almost uniformly): the default model trained at 16K tokens
# with dense exact attention, then sparse vs dense chunked gradients on validation batches for several budgets and
# selection rules (sparse_attn.py: mean key, Quest's key bound)
if want sparse-fid-train || { want sparse-fidelity && [ ! -f /tmp/fid/ckpt.pt ]; }; then
    rm -rf /tmp/fid
    stage fid-train 240 bash -c "$PY train.py --seq 16384 --chunk 4096 --attn dense --steps 300 --eval-iters 1 \
        --out /tmp/fid 2>&1 | tr '\r' '\n' | grep -E '^(model|done|error)'; cp /tmp/fid/log.jsonl '$OUT/fid_train.jsonl'"
fi
if want sparse-fidelity; then
    stage sparse-fidelity 400 "$PY" bench.py fidelity --ckpt /tmp/fid/ckpt.pt --seq 16384 --chunk 1024 \
        --budgets ${BUDGETS:-256,512,1024,2048,4096} --q-blocks ${QBLOCKS:-128} --rule ${RULES:-meankey,quest} \
        --batches 2
fi
# loss curves: the same short run from scratch, dense vs sparse (1024-token chunks and budget: mostly sparse)
for attn in ${CURVES:-dense sparse}; do
    want sparse-curves || break
    rm -rf /tmp/curve_$attn
    stage curve-$attn 400 bash -c "timeout 380 $PY train.py --seq 16384 --chunk 1024 --attn $attn --budget 1024 \
        --steps 150 --eval-iters 1 --out /tmp/curve_$attn >/tmp/curve_$attn.txt 2>&1; rc=\$?; \
        tr '\r' '\n' </tmp/curve_$attn.txt | grep -E '^(model|done|error)'; \
        cp /tmp/curve_$attn/log.jsonl '$OUT/curve_$attn.jsonl'; exit \$rc"
done
# speed: tokens/s at 32K (dense and sparse) and at 1M (sparse), 0.5B, pages on the GPU
want sparse-speed && stage sparse-speed 330 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True bash -c "\
    $PY bench.py step --model qwen2.5-0.5b --lengths 32768 --chunk 4096 --page-size 64 --stores paged,sparse \
    --budget 4096 --warmup 1 --repeats 2 --no-baseline && $PY bench.py step --model qwen2.5-0.5b \
    --lengths 1048576 --chunk 4096 --page-size 64 --stores sparse --budget 4096 --warmup 1 --repeats 1 --no-baseline"
# where a sparse step's time goes vs a dense one (small model, 1K chunks: per-call overheads show)
want sparse-profile && stage sparse-profile 200 "$PY" bench.py step --model small --lengths 16384 --chunk 1024 \
    --page-size 64 --stores paged,sparse --budget 1024 --warmup 1 --repeats 2 --no-baseline --profile 30
want sparse-7b && stage sparse-7b 250 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    "$PY" bench.py step --model qwen2.5-7b --params-dtype bfloat16 --lengths 131072 --chunk 4096 --checkpoint \
    --page-size 64 --stores sparse --budget 4096 --warmup 1 --repeats 2 --no-baseline
# the default long run: python train.py --seq 1000000 (sparse by default), whole run timed
if want sparse-train-1m; then
    rm -rf /tmp/run1m
    stage sparse-train-1m 560 bash -c "t0=\$(date +%s); $PY train.py --seq 1000000 --out /tmp/run1m 2>&1 | \
        tr '\r' '\n' | grep -E '^(model|done|error)'; echo \"wall \$((\$(date +%s) - t0)) s\"; \
        cp /tmp/run1m/log.jsonl '$OUT/train_1m.jsonl'"
fi

# --- sparse attention over offloaded pages: only the selected pages move (offload.py, sparse parts)
# how scattered pages can move: one copy per page vs a gather kernel on the pinned pool's device view
want copy-probe && stage copy-probe 60 "$PY" bench/copy_probe.py
want sparse-offload-tests && stage sparse-offload-tests 200 bash -c "$PY -m pytest -q tests/test_offload.py \
    >'$OUT/pytest_sparse_offload.txt' 2>&1; rc=\$?; tail -5 '$OUT/pytest_sparse_offload.txt'; exit \$rc"
# step time, sparse with pages on the GPU vs offloaded (0.5B at 128K, 7B at 128K), and the loss difference
want sparse-offload-speed && stage sparse-offload-speed 200 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    "$PY" bench.py step --model qwen2.5-0.5b --lengths 131072 --chunk 4096 --page-size 64 \
    --stores ${STORES:-sparse,sparse-offload} --budget 4096 --q-block ${QBLOCK:-128} --warmup 1 --repeats 2 \
    --no-baseline
want sparse-offload-7b && stage sparse-offload-7b 300 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    "$PY" bench.py step --model qwen2.5-7b --params-dtype bfloat16 --lengths 131072 --chunk 4096 --checkpoint \
    --page-size 64 --stores ${STORES:-sparse,sparse-offload} --budget 4096 --q-block ${QBLOCK:-128} --warmup 1 \
    --repeats 1 --no-baseline
# peak GPU memory vs length, whole sparse steps with offloaded pages (0.5B to 1M; 7B at 1M in the next stage)
want sparse-offload-growth && stage sparse-offload-growth 400 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    "$PY" bench.py step --model qwen2.5-0.5b --lengths 65536,262144,1048576 --chunk 4096 --page-size 64 \
    --stores sparse-offload --budget 4096 --q-block ${QBLOCK:-128} --warmup 0 --repeats 1 --no-baseline
# through train.py: sparse attention over offloaded pages (--q-block defaults to the chunk there), AdamW, 0.5B
if want sparse-offload-train; then
    rm -rf /tmp/runso
    stage sparse-offload-train 240 bash -c "$PY train.py --model qwen2.5-0.5b --seq 131072 --attn sparse \
        --offload on --steps 3 --eval-iters 1 --host-memory 100 --out /tmp/runso 2>&1 | tr '\r' '\n' | \
        grep -E '^(model|done|error)'; cp /tmp/runso/log.jsonl '$OUT/train_sparse_offload.jsonl'"
fi
want sparse-offload-7b-1m && stage sparse-offload-7b-1m 580 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    "$PY" bench.py step --model qwen2.5-7b --params-dtype bfloat16 --lengths 1048576 --chunk 4096 --checkpoint \
    --page-size 64 --stores sparse-offload --grad-pages bfloat16 --budget 4096 --q-block ${QBLOCK:-128} \
    --warmup 0 --repeats 1 --no-baseline
# Qwen2.5-0.5B, a whole sparse step at 4M tokens with offloaded (bf16 dK/dV) pages, one selection per chunk
want sparse-offload-4m && stage sparse-offload-4m 590 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    "$PY" bench.py step --model qwen2.5-0.5b --lengths 4194304 --chunk 4096 --page-size 64 --stores sparse-offload \
    --grad-pages bfloat16 --budget 4096 --q-block 4096 --warmup 0 --repeats 1 --no-baseline --progress

# HF transformers anchors (GPU ceilings + Qwen2.5-7B with gradient checkpointing until OOM)
if want hf-baseline; then
    if [ -f shared/bench/hf_baseline.py ] && "$PY" -c "import transformers" 2>/dev/null; then
        stage hf-baseline 120 "$PY" shared/bench/hf_baseline.py qwen2.5-7b
    else
        echo "[hf-baseline] skipped: shared/bench/hf_baseline.py missing or transformers not importable"
    fi
fi

# --- summary (the device call returns only the last 12,000 characters of output)
echo
echo "==================== SUMMARY ($((SECONDS - START)) s; details in \$OUT/log.txt)"
printf '%s\n' "${STATUS[@]}"
[ -f "$OUT/pytest.txt" ] && { echo "--- pytest"; tail -n 4 "$OUT/pytest.txt"; }
[ -f "$OUT/pytest_offload.txt" ] && { echo "--- pytest offload"; tail -n 4 "$OUT/pytest_offload.txt"; }
[ -f "$OUT/pytest_sparse.txt" ] && { echo "--- pytest sparse"; tail -n 4 "$OUT/pytest_sparse.txt"; }
[ -f "$OUT/train.txt" ] && { echo "--- train"; tr '\r' '\n' <"$OUT/train.txt" | grep -E "^(model:|done:|error)" | cut -c1-300; }
[ -f /tmp/run/log.jsonl ] && "$PY" - <<'EOF2'
import json, statistics
rows = [json.loads(line) for line in open("/tmp/run/log.jsonl")]
rates = [r["tokens_per_s"] for r in rows[1:]] or [rows[0]["tokens_per_s"]]  # step 1 includes warm-up
print(f"train: {len(rows)} steps, loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}, "
      f"val {rows[-1].get('val_loss')}, median {statistics.median(rates):,.0f} tok/s, "
      f"peak {max(r['peak_mem_gib'] for r in rows):.2f} GiB")
EOF2
[ -f "$OUT/anchors.jsonl" ] && { echo "--- anchors"; cut -c1-200 "$OUT/anchors.jsonl"; }
echo "--- bench"
"$PY" bench.py summary --out "$OUT"
