#!/usr/bin/env bash
# Every GPU benchmark of the project, run ON the GPU machine (a device call, or any CUDA host with
# Python 3.12 and torch 2.11+cu130). Results go to $OUT (or bench/results/ when OUT is unset),
# each with the command, device and versions that made it.
#
#   scripts/gpu_wheels.sh                      # here, once: the wheels into .whl/ (see that script)
#   # then on the GPU machine, from the repo root (device call with carry: [".whl", ...]):
#   scripts/gpu_bench.sh smoke                 # wheels import, GPU tests, 1B equality + step timings (~3 min)
#   scripts/gpu_bench.sh kernels               # #19's decode-step kernels, one GPU (~2 min): the 8B batch-1 step's
#                                              # kernel table and graph step time, the GPU tests of the Triton
#                                              # decode attention / cache write, their per-layer times alone
#   scripts/gpu_bench.sh llama                 # bench/results/inference_llama_gpu.json, three shapes (~7 min)
#   scripts/gpu_bench.sh llama-tp2             # the same with model.tp_size 2 (2 GPUs): fills its "tp2" section, for
#                                              # model.numerics default and tp_invariant (2 shards) each
#   scripts/gpu_bench.sh tp-invariant          # 2 GPUs, <= 400 s: 8B tp_size 2 vs 1 with model.numerics default, then
#                                              # tp_invariant over 2 shards: greedy tokens + every step's logits equal?
#                                              # then tokens/s c1/c64 of both modes at tp 2 and 1 (the mode's cost)
#   scripts/gpu_bench.sh llama-pending         # 2 GPUs, one <= 400 s call: 8B batch-1 floor (GPU 1) and Qwen2.5-7B
#                                              # at prompt 128 (GPU 0) side by side, then 8B tp_size 2 vs 1; each
#                                              # part under its own timeout, its JSON in $OUT when it finishes
#   scripts/gpu_bench.sh pipeline              # 1 GPU, <= 420 s: 8B batch-1 floor after pipelined decode + the fused
#                                              # decode attention (c 1/64, 8B HF check), pipelining on vs off (tokens
#                                              # equal, ms/token), the 8B step's kernel profile
#   scripts/gpu_bench.sh history               # GPT-2-medium / OPT-1.3B rows (bench/inference_gpu.py)
#   scripts/gpu_bench.sh tracing               # bench/tracing_gpu.py (CUPTI kernel spans)
#   scripts/gpu_bench.sh sampling              # bench/sampling_step.py + sampling_overhead.py: #20's options on vs off, c=16 (~3 min),
#                                              # then bench/logprobs_host.py (the logprobs host path per token, CPU)
#   scripts/gpu_bench.sh hot-swap              # bench/results/hot_swap_gpu.json: llama-3.2-1b v1 (seed 0) -> v2 (seed 1)
#                                              # swapped under an open loop on one GPU, server alone (~3 min)
#   scripts/gpu_bench.sh replicas              # 2 GPUs: two replicas behind Envoy vs one (bench/replica_failover.py gpu);
#                                              # needs scripts/replica_gpu_wheels.sh here first and carry .gpu/replicas-envoy
#
# Extra arguments after the mode go to the benchmark script. KG_WHEELS names the wheel folder
# (default: .whl in the repo root). The wheels install into /tmp/site (first call only).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODE="${1:-smoke}"
shift || true
WHEELS="${KG_WHEELS:-$ROOT/.whl}"
OUT="${OUT:-$ROOT/bench/results}"
mkdir -p "$OUT"
# Everything printed (this process, the servers' and every tensor-parallel rank's lines that reach
# this output) also goes to the log folder.
exec > >(tee -a "$OUT/gpu_bench-$MODE.log") 2>&1

if [ ! -f /tmp/site/.kernelgate-wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  touch /tmp/site/.kernelgate-wheels
fi
export PYTHONPATH="/tmp/site:$ROOT" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# DeepSpeed's op builder parses this as numbers ("9.0a" fails): the plain compute capability.
export TORCH_CUDA_ARCH_LIST="$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"

# The wheels this checkout's serving path imports (an older .whl folder lacks them).
check_wheels() {
  python3 -c "import orjson, llguidance" || { echo "gpu_bench.sh: wheels missing: re-run scripts/gpu_wheels.sh here" >&2; exit 1; }
}

case "$MODE" in
  smoke)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c 'import torch, transformers, deepspeed, triton, opentelemetry.sdk, pydantic; print("torch", torch.__version__, "transformers", transformers.__version__, "deepspeed", deepspeed.__version__, "triton", triton.__version__)'
    tests=0
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/inference/test_llama_gpu.py "$@" || tests=$?
    python3 bench/inference_llama_gpu.py --models llama-3.2-1b,llama-3.1-8b --skip hf,server --step-ops deepspeed,triton \
      --out "$OUT/inference_llama_gpu_smoke.json" --log-dir "$OUT"
    exit "$tests"
    ;;
  kernels)
    # (~2-3 min) the 8B batch-1 step first (its kernel table, graph step time), then the GPU tests of
    # the decode kernels, then their per-layer times and the batch-1 weight products alone
    rc=0
    timeout 100 python3 bench/decode_step_profile.py --model llama-3.1-8b --out "$OUT/decode_step_profile_8b.json" || rc=$?
    timeout 80 python3 -m pytest -q -p no:cacheprovider -m gpu tests/inference/test_llama_gpu.py \
      -k "decode_attention or decode_kernel or rotary_kv or greedy_equals" "$@" || rc=$?
    timeout 60 python3 bench/decode_attention_gpu.py --batches 1 --kv 256,2048 --out "$OUT/decode_attention_gpu.json" || rc=$?
    exit "$rc"
    ;;
  llama)
    python3 bench/inference_llama_gpu.py --out "$OUT/inference_llama_gpu.json" --log-dir "$OUT" "$@"
    ;;
  llama-tp2)
    python3 bench/inference_llama_gpu.py --tp 2 --skip hf,step --concurrency 1,64 --prompt-tokens 128 --models llama-3.1-8b,qwen2.5-7b \
      --numerics default,tp_invariant --numerics-shards 2 --out "$OUT/inference_llama_gpu_tp2.json" --log-dir "$OUT" "$@"
    ;;
  tp-invariant)
    # #19's tp_size 2 == 1 item, 8B fp16, one call <= KG_BUDGET_S (390 s, wheels included). In order, the JSON
    # rewritten after each part (a cut run keeps what it measured): greedy + logits tp 2 vs 1 with the default
    # numerics, then with tp_invariant (2 shards); then the server's tokens/s at c1 and c64: tp 2 default,
    # tp 2 tp_invariant, tp 1 default, tp 1 tp_invariant. Figures under "tp2"."llama-3.1-8b" (the invariant
    # mode's under its "tp_invariant" key).
    check_wheels
    budget="${KG_BUDGET_S:-390}"
    rc=0; timeout $((budget - SECONDS)) python3 bench/inference_llama_gpu.py --tp 2 --models llama-3.1-8b \
      --numerics default,tp_invariant --numerics-shards 2 --skip hf,step --check-model '' --concurrency 1,64 \
      --prompt-tokens 128 --step-timeout 150 --ready-timeout 150 --out "$OUT/inference_llama_gpu_tp_invariant.json" \
      --log-dir "$OUT/tp_invariant" "$@" || rc=$?
    echo "[tp-invariant] exit $rc after ${SECONDS}s"; grep -E "^\[tp2\]|^\[kernelgate" "$OUT/gpu_bench-tp-invariant.log" | tail -n 8
    exit "$rc"
    ;;
  llama-pending)
    budget="${KG_BUDGET_S:-390}"  # seconds for the whole call, wheels included
    bench=(python3 bench/inference_llama_gpu.py --prompt-tokens 128 --check-model '' --ready-timeout 150)
    ( rc=0; CUDA_VISIBLE_DEVICES=1 timeout 170 "${bench[@]}" --models llama-3.1-8b --concurrency 1 --skip hf \
        --out "$OUT/inference_llama_gpu_8b_bs1.json" --log-dir "$OUT/8b_bs1" > "$OUT/8b_bs1.log" 2>&1 || rc=$?
      echo "[llama-pending] 8B batch-1 floor: exit $rc" ) &
    floor_job=$!
    rc=0; CUDA_VISIBLE_DEVICES=0 timeout 200 "${bench[@]}" --models qwen2.5-7b \
      --out "$OUT/inference_llama_gpu_qwen.json" --log-dir "$OUT/qwen" > "$OUT/qwen.log" 2>&1 || rc=$?
    echo "[llama-pending] Qwen2.5-7B: exit $rc"
    wait "$floor_job"  # (a bare wait would also wait for the tee above: forever)
    tail -n 3 "$OUT/8b_bs1.log" "$OUT/qwen.log"
    left=$((budget - SECONDS))
    if [ "$left" -lt 90 ]; then echo "[llama-pending] tp2 skipped: ${left}s left"; exit 3; fi
    rc=0; timeout "$left" "${bench[@]}" --tp 2 --skip hf,step --concurrency 1,64 --models llama-3.1-8b \
      --step-timeout 150 --out "$OUT/inference_llama_gpu_tp2.json" --log-dir "$OUT/tp2" "$@" || rc=$?
    echo "[llama-pending] tp2: exit $rc"
    ;;
  pipeline)
    # #19's batch-1 floor after pipelined decode and the one-kernel decode attention, one GPU, <= KG_BUDGET_S
    # (480 s), most important first, each part under its own timeout and only if the time left allows:
    # 1. the 8B server at c=1 and 64, the step alone, the copy bandwidth (floor_ratio_bs1)
    # 2. the 8B fused decoder against HF: teacher-forced logits/argmax, greedy tokens (the new kernel's check)
    # 3. pipelined decode on vs off in one process (greedy tokens equal; batch-1 ms/token side by side)
    # 4. the 8B decode step's kernels (bench/decode_step_profile.py), fused attention vs op by op
    check_wheels
    budget="${KG_BUDGET_S:-480}"
    left() { echo $((budget - SECONDS)); }
    bench=(python3 bench/inference_llama_gpu.py --prompt-tokens 128 --models llama-3.1-8b --ready-timeout 150)
    rc=0; timeout 240 "${bench[@]}" --check-model '' --concurrency 1,64 --skip hf \
      --out "$OUT/inference_llama_gpu_8b_bs1.json" --log-dir "$OUT/8b_bs1" > "$OUT/8b_bs1.log" 2>&1 || rc=$?
    echo "[pipeline] 8B floor: exit $rc"; tail -n 4 "$OUT/8b_bs1.log"
    if [ "$(left)" -ge 100 ]; then
      rc=0; timeout $(( $(left) < 150 ? $(left) : 150 )) "${bench[@]}" --check-model llama-3.1-8b --skip hf,server,step \
        --out "$OUT/inference_llama_gpu_8b_check.json" --log-dir "$OUT/8b_check" > "$OUT/8b_check.log" 2>&1 || rc=$?
      echo "[pipeline] 8B vs HF: exit $rc"; grep -E "\[check\]|greedy" "$OUT/8b_check.log" | tail -n 3
    else echo "[pipeline] 8B vs HF skipped: $(left)s left"; fi
    if [ "$(left)" -ge 90 ]; then
      rc=0; timeout $(( $(left) < 150 ? $(left) : 150 )) python3 bench/pipeline_gpu.py --model llama-3.1-8b --rounds 3 \
        --out "$OUT/pipeline_gpu.json" > "$OUT/pipeline_gpu.log" 2>&1 || rc=$?
      echo "[pipeline] on vs off: exit $rc"; tail -n 3 "$OUT/pipeline_gpu.log"
    else echo "[pipeline] on vs off skipped: $(left)s left"; fi
    if [ "$(left)" -ge 60 ]; then
      rc=0; timeout "$(left)" python3 bench/decode_step_profile.py --model llama-3.1-8b \
        --out "$OUT/decode_step_profile_8b.json" > "$OUT/decode_step_profile.log" 2>&1 || rc=$?
      echo "[pipeline] step profile: exit $rc"; head -n 24 "$OUT/decode_step_profile.log"
    else echo "[pipeline] step profile skipped: $(left)s left"; fi
    ;;
  history)
    python3 bench/inference_gpu.py --out "$OUT/inference_gpu.json" --log-dir "$OUT" "$@"
    ;;
  tracing)
    python3 bench/tracing_gpu.py --out "$OUT/tracing_gpu.json" --log-dir "$OUT" "$@"
    ;;
  sampling)
    check_wheels
    python3 bench/sampling_step.py --device cuda --out "$OUT/sampling_step_gpu.json"
    python3 bench/sampling_overhead.py --window-s 6 --rounds 3 --out "$OUT/sampling_overhead.json" --log-dir "$OUT" "$@"
    # the logprobs path's host work per token on this machine's CPU (no GPU; ~15 s)
    python3 bench/logprobs_host.py --steps 256 --out "$OUT/logprobs_host.json"
    ;;
  hot-swap)
    check_wheels
    python3 bench/hot_swap.py --direct --device cuda --model llama-3.2-1b --rate 20 --max-tokens 32 --slots 16 \
      --window-s 10 --warm-up-s 5 --swap-allowance-s 40 --out "$OUT/hot_swap_gpu.json" \
      --note "one GPU, the inference server alone (the GPU image has no Envoy/OPA): v2 (random weights, seed 1) loads, is validated and activated beside v1 (seed 0) on the same GPU while v1 serves the open loop" "$@"
    ;;
  replicas)
    python3 -c "import lzma, os, shutil; shutil.copyfileobj(lzma.open('.gpu/replicas-envoy/envoy.xz'), open('/tmp/envoy', 'wb')); os.chmod('/tmp/envoy', 0o755)"
    python3 bench/replica_failover.py gpu --envoy /tmp/envoy --log-dir /tmp/kg-replicas \
      --out "$OUT/replica_failover_gpu.json" --merge "$OUT/replica_failover.json" "$@" \
      || { tail -n 40 /tmp/kg-replicas/*.log; exit 1; }
    ;;
  *)
    echo "gpu_bench.sh: unknown mode '$MODE' (smoke, kernels, llama, llama-tp2, tp-invariant, llama-pending, pipeline, history, tracing, replicas, sampling, hot-swap)" >&2
    exit 2
    ;;
esac
