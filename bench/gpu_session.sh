#!/usr/bin/env bash
# One lease of the GPU machine, planned: the GPU rows of issues 12, 13 and 15 in three calls of at
# most ten minutes each, after shared/tools/te-on-device has installed TE and megatron-core in
# /tmp/site. On a two-GPU machine the two chains of a phase run side by side, one per GPU; on one GPU
# they run one after the other (and the deadlines cut what does not fit).
#
#   bash bench/gpu_session.sh a    # GPU0: ckpt_bench async (1b, 8b) | GPU1: family_bench --fp8
#   bash bench/gpu_session.sh b    # GPU0: modes_bench               | GPU1: gpu_bench 8-microbatch rows
#   bash bench/gpu_session.sh c    # scaling.py llama32_1b at DP, TP, PP, CP on 1 and 2 GPUs
#   bash bench/gpu_session.sh d    # what session 5 left: GPU0: ckpt_bench 1b+8b async+sync (resume load
#                                  # included) | GPU1: family_bench gpt_oss_20b (TE's attention-backend
#                                  # choice logged: sinks + windows failed in session 5), then
#                                  # modes_bench distill; afterwards scaling.py --layouts cp
#   bash bench/gpu_session.sh e    # diagnosis of session 5's GPT-OSS failure, about 2 minutes:
#                                  # GPT-OSS@2 with TE's backend choice logged | with TE's
#                                  # fused attention off, then with per-expert MLPs (no grouped GEMM)
#   bash bench/gpu_session.sh f    # after e's fixes: CP=2 scaling row | GPT-OSS@2 bf16+FP8 (grouped GEMM),
#                                  # and bf16 with per-expert MLPs
#   bash bench/gpu_session.sh g    # needs only megatron-core (no TE build): the first async save's pinned
#                                  # allocation, PyTorch's default vs cudaHostRegister in 8 threads (1b,
#                                  # 3 saves, resume); then `h`: the 8b shape after the writer fix
#   bash bench/gpu_session.sh i    # megatron-core only: 1b and 8b async saves with the first save's
#                                  # pinned memory reserved ahead (g showed registering does not help)
#   bash bench/gpu_session.sh j    # pinned_alloc_bench (ways to pin, and their cost to training), then
#                                  # 1b async saves with pruning off the training thread
#   bash bench/gpu_session.sh k    # the same with the shared-mapping variant and a forked reader, and 1b
#                                  # staged into runtime/pinned_staging.StagingArena
#
# Everything lands under $OUT/<phase>/ (JSON, logs); each chain's table is printed last.
set -u
phase=${1:?phase a, b, c, d, e, f, g, h, i, j or k}
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
out=${OUT:-/tmp/out}/$phase
mkdir -p "$out"
ngpu=$(nvidia-smi -L | wc -l)
acc=H200-141GB
nvidia-smi -L | grep -q H100 && acc=H100-80GB

# chain GPU SECONDS NAME COMMAND...: COMMAND on one GPU, its output in $out/NAME.log
chain() {
  local gpu=$1 secs=$2 name=$3; shift 3
  CUDA_VISIBLE_DEVICES=$gpu timeout -k 10 "$secs" "$@" >"$out/$name.log" 2>&1
  echo "== $name: exit $?" >>"$out/$name.log"
}

run_pair() {  # two chains: side by side on two GPUs, else one after the other on GPU 0
  local secs=$1
  if [ "$ngpu" -ge 2 ]; then
    chain 0 "$secs" "$2" bash -c "$3" & chain 1 "$secs" "$4" bash -c "$5" & wait
  else
    chain 0 $((secs / 2)) "$2" bash -c "$3"; chain 0 $((secs / 2)) "$4" bash -c "$5"
  fi
  for name in "$2" "$4"; do echo "######## $name"; tail -n 40 "$out/$name.log"; done
}

case $phase in
a)
  run_pair 560 \
    ckpt "python3 bench/ckpt_bench.py --shapes 1b,8b --modes async --saves 2 --save-interval 6 --dir /tmp \
          --out $out/ckpt --deadline-s 330 --timeout-s 240 --override launch.accelerator=$acc" \
    family "python3 bench/family_bench.py --fp8 --rows gemma3_1b,gemma3_27b,deepseek_v3,gpt_oss_20b \
          --steps 12 --warmup 4 --timeout-s 150 --accelerator $acc --out $out/family" ;;
b)
  run_pair 560 \
    modes "python3 bench/modes_bench.py --steps 10 --warmup 3 --records 1500 --timeout-s 200 --out $out/modes" \
    gpu "python3 bench/gpu_bench.py --steps 20 --warmup 10 --deadline-s 470 --out $out/gpu \
          --variants hf,bf16,bf16+mb1,bf16+pao,fp8_delayed,fp8_blockwise,hf@8b,bf16@8b,fp8_blockwise@8b" ;;
c)
  timeout -k 10 560 python3 bench/scaling.py llama32_1b --gpus 1,2 --layouts dp,tp,pp,cp --steps 15 \
    --warmup 5 --log-interval 5 --timeout-s 150 --out /tmp/scaling --json "$out/scaling.json" \
    >"$out/scaling.log" 2>&1
  echo "== scaling: exit $?"; tail -n 40 "$out/scaling.log" ;;
d)
  run_pair 560 \
    ckpt "python3 bench/ckpt_bench.py --shapes 1b,8b --modes async,sync --saves 2 --save-interval 6 --dir /tmp \
          --out $out/ckpt --deadline-s 400 --timeout-s 200 --override launch.accelerator=$acc" \
    rest "NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2 python3 bench/family_bench.py --fp8 --rows gpt_oss_20b --steps 12 --warmup 4 --timeout-s 150 \
          --accelerator $acc --out $out/family; \
          python3 bench/modes_bench.py --parts distill --steps 10 --warmup 3 --records 1500 --timeout-s 200 \
          --out $out/modes" ;;
e)
  oss="python3 bench/family_bench.py --rows gpt_oss_20b --steps 6 --warmup 2 --timeout-s 150 --accelerator $acc"
  run_pair 400 \
    oss_debug "NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2 $oss --out $out/oss_debug" \
    oss_variants "NVTE_FUSED_ATTN=0 $oss --out $out/oss_unfused; $oss --override model.moe_grouped_gemm=false \
      --out $out/oss_sequential"
  # the first rank's traceback of every failed launch, whole
  for log in "$out"/*/*.log "$out"/scaling/*/launch.log; do
    [ -f "$log" ] && grep -q "Traceback" "$log" || continue
    echo "######## $log"; grep -m1 -A40 "Traceback" "$log" | cut -c1-300
  done ;;
f)
  if [ "$ngpu" -ge 2 ]; then
    timeout -k 10 230 python3 bench/scaling.py llama32_1b --gpus 1,2 --layouts cp --steps 15 --warmup 5 \
      --log-interval 5 --timeout-s 150 --out "$out/scaling" --json "$out/scaling.json" >"$out/scaling.log" 2>&1
    echo "== scaling cp: exit $?"; tail -n 8 "$out/scaling.log"
  fi
  oss="python3 bench/family_bench.py --rows gpt_oss_20b --steps 12 --warmup 4 --timeout-s 150 --accelerator $acc"
  run_pair 330 \
    oss "$oss --fp8 --out $out/family" \
    oss_sequential "$oss --override model.moe_grouped_gemm=false --out $out/oss_sequential"
  for log in "$out"/*/*.log "$out"/scaling/*/launch.log; do
    [ -f "$log" ] && grep -q "Traceback" "$log" || continue
    echo "######## $log"; grep -m1 -B14 -A2 "\]: [A-Za-z_.]*\(Error\|Exception\)" "$log" | cut -c1-400
  done ;;
g|h)  # needs megatron-core only: pip install --no-deps --target /tmp/site .te/extra/{megatron_core,pydantic*,...}
  shape=1b interval=12 variants="default register"
  [ "$phase" = h ] && shape=8b interval=30 variants=register
  register='+launch.env.PYTORCH_CUDA_ALLOC_CONF="pinned_use_cuda_host_register:True,pinned_num_register_threads:8"'
  for variant in $variants; do
    extra=(); [ "$variant" = register ] && extra=(--override "$register")
    timeout -k 10 280 python3 bench/ckpt_bench.py --shapes "$shape" --modes async --saves 3 \
      --save-interval "$interval" --dir /tmp --out "$out/$variant" --timeout-s 250 \
      --override launch.accelerator=$acc "${extra[@]}" >"$out/$variant.log" 2>&1
    echo "== $shape $variant: exit $?"; tail -n 6 "$out/$variant.log" | cut -c1-700
    grep -h "saving checkpoint\|saved checkpoint\|resumed from" "$out/$variant"/*.log | cut -c1-400
  done ;;
i)  # after g: the first save's pinned memory reserved during the first steps (runtime/pinned_staging.py)
  for spec in "1b 12 260" "8b 20 290"; do
    set -- $spec
    timeout -k 10 "$3" python3 bench/ckpt_bench.py --shapes "$1" --modes async --saves 3 --save-interval "$2" \
      --dir /tmp --out "$out/$1" --timeout-s $(($3 - 30)) --override launch.accelerator=$acc >"$out/$1.log" 2>&1
    echo "== $1: exit $?"; tail -n 8 "$out/$1.log" | cut -c1-900
    grep -h "saving checkpoint\|saved checkpoint\|resumed from\|did not match" "$out/$1"/*.log | cut -c1-500
  done ;;
j)  # after i: how pinning can be done (alone and beside a matmul loop); 1b again with pruning off the loop
  timeout -k 10 150 python3 bench/pinned_alloc_bench.py --gib 8 --json "$out/pinned_alloc.json" >"$out/pinned.log" 2>&1
  echo "== pinned_alloc_bench: exit $?"; tail -n 9 "$out/pinned.log"
  timeout -k 10 270 python3 bench/ckpt_bench.py --shapes 1b --modes async --saves 3 --save-interval 12 --dir /tmp \
    --out "$out/1b" --timeout-s 240 --override launch.accelerator=$acc >"$out/1b.log" 2>&1
  echo "== 1b: exit $?"; tail -n 8 "$out/1b.log" | cut -c1-900
  grep -h "saving checkpoint\|saved checkpoint\|resumed from\|did not match" "$out/1b"/*.log | cut -c1-500 ;;
k)  # after j: pinning incl. the arena's shared mapping and a forked reader; 1b staged into the arena
  timeout -k 10 100 python3 bench/pinned_alloc_bench.py --gib 8 --json "$out/pinned_alloc.json" >"$out/pinned.log" 2>&1
  echo "== pinned_alloc_bench: exit $?"; tail -n 11 "$out/pinned.log"
  timeout -k 10 270 python3 bench/ckpt_bench.py --shapes 1b --modes async --saves 3 --save-interval 12 --dir /tmp \
    --out "$out/1b" --timeout-s 240 --override launch.accelerator=$acc >"$out/1b.log" 2>&1
  echo "== 1b: exit $?"; tail -n 8 "$out/1b.log" | cut -c1-900
  grep -h "saving checkpoint\|saved checkpoint\|resumed from\|did not match" "$out/1b"/*.log | cut -c1-500
  grep -h "step 3[4-8]/" "$out/1b"/*.log | cut -c1-90 ;;
*) echo "phase a, b, c, d, e, f, g, h, i, j or k"; exit 2 ;;
esac
