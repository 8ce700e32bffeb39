#!/usr/bin/env bash
# The GPU measurements behind docs/benchmarks.md, for a 4×H200 machine (run from the repo root).
#   bash bench/gpu_suite.sh single   # four 1-GPU runs side by side (one per GPU) + the FP8 error check
#   bash bench/gpu_suite.sh multi    # the timestep-forcing pipeline on 2 and 4 GPUs
#   bash bench/gpu_suite.sh fused    # + compiled RoPE and VAE, on 1, 2 and 4 GPUs
#   bash bench/gpu_suite.sh balanced # steps cut between ranks so the VAE rank is not the bottleneck
# Results: $OUT (or bench/results/gpu) gets one JSON and one log per run.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export TORCH_LOGS=recompiles
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
# 8 warm-up blocks: the compiled VAE still recompiled (~1 s each) in blocks 5-7 of a 12-block run
COMMON=(--arch 14b --size 704*384 --blocks 16 --warmup 8)
bench() {  # bench NAME GPUS... -- ARGS...
  local name=$1; shift
  local gpus=$1; shift
  CUDA_VISIBLE_DEVICES=$gpus timeout 400 python3 -m server.cli bench "${COMMON[@]}" "$@" --json "$OUT/$name.json" >"$OUT/$name.log" 2>&1
  echo "$name exit $?"
}
case "${1:-single}" in
  single)
    nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv >"$OUT/gpus.txt"
    # the FP8 error check follows the short eager run on its GPU, while the compiled runs go on
    (bench 1gpu_eager_bf16 0 --engine eager
     CUDA_VISIBLE_DEVICES=0 timeout 200 python3 bench/fp8_error.py --arch 14b --size 704*384 >"$OUT/fp8_error.json" 2>"$OUT/fp8_error.log") &
    bench 1gpu_eager_fp8 1 --engine eager --fp8 &
    bench 1gpu_compile_bf16 2 --engine compile &
    bench 1gpu_compile_fp8 3 --engine compile --fp8 &
    wait
    ;;
  multi)
    bench 2gpu_compile_fp8 0,1 --engine compile --fp8 --gpus 2 &
    bench 2gpu_eager_fp8 2,3 --engine eager --fp8 --gpus 2 &
    wait
    bench 4gpu_compile_fp8 0,1,2,3 --engine compile --fp8 --gpus 4
    ;;
  fused)  # compiled RoPE and VAE on top of compile + FP8; 1 and 2 GPUs side by side, then 4
    X=(--engine compile --compile-rope --compile-vae)
    bench 1gpu_compile_bf16_fused 0 "${X[@]}" &
    bench 1gpu_compile_fp8_fused 1 "${X[@]}" --fp8 &
    bench 2gpu_compile_fp8_fused 2,3 "${X[@]}" --fp8 --gpus 2 &
    wait
    bench 4gpu_compile_fp8_fused 0,1,2,3 "${X[@]}" --fp8 --gpus 4
    bench 4gpu_compile_fp8_fused_decoderank 0,1,2,3 "${X[@]}" --fp8 --gpus 4 --decode-rank
    ;;
  balanced)  # the VAE counted as 0.65 step compiled (120/182 ms), 0.93 eager (169/182 ms)
    X=(--engine compile --compile-rope --fp8)
    bench 2gpu_balanced 0,1 "${X[@]}" --compile-vae --gpus 2 --balance --decode-cost 0.65 &
    bench 2gpu_balanced_eagervae 2,3 "${X[@]}" --gpus 2 --balance --decode-cost 0.93 &
    wait
    bench 4gpu_balanced 0,1,2,3 "${X[@]}" --compile-vae --gpus 4 --balance --decode-cost 0.65
    bench 4gpu_balanced_eagervae 0,1,2,3 "${X[@]}" --gpus 4 --balance --decode-cost 0.93
    ;;
esac
for f in "$OUT"/*.log; do echo "== $f"; grep "^|" "$f" | grep -E "fps|latency|DiT|VAE|engine"; done
