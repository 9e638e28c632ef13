#!/usr/bin/env bash
# The GPU check (issues 12, 19, 21) on one H100/H200-class GPU. The earlier parts took 4 min 51 s on an H200; the
# compiled-speed, host-overhead and speed-goal parts have not yet run on a GPU (no session had one), so their time is unknown.
#   1. the tests marked `cuda`;  2. the speed benchmark (benchmarks/engine.py), eager, then compiled against eager
#   (DeiT-S, bf16, batch 1 and 64: each model compiles per batch size and precision), and the host-overhead proxy (benchmarks/host_overhead.py);  3. atm eval, atm calibrate
#   --n-trials 5 and atm stress --limit 500 on the embedded model with --device cuda in fp32, bf16 and fp16
#   (eval compiles on CUDA: --compile auto);  4. atm calibrate --target-speedup 1.3 in bf16.
# One summary line per part (each part stopped after PART_LIMIT seconds, 240 unless set); the exit status is
# non-zero when any part failed. Logs and JSON go to $OUT (default: runs/gpu-check). DEVICE=cpu (with
# PRECISIONS=fp32,bf16) tries the script itself on a machine without a GPU. The speed benchmark reads the
# ImageNet sample from .cache/imagenet-val-sample.tar.gz when it is there (../shared/data/ otherwise).
#
# The GPU machines have torch, torchvision, timm, typer, rich, pyyaml and safetensors but no package index:
# atm runs from this checkout (no install), and Optuna with what it needs travels as wheels in .whl/
# (make them with benchmarks/gpu_wheels.sh on a machine with an index).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
DEVICE=${DEVICE:-cuda}
PRECISIONS=${PRECISIONS:-fp32,bf16,fp16}
PART_LIMIT=${PART_LIMIT:-240}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/atm-site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/atm-site
fi
failed=0
part() {  # part NAME COMMAND...: run it, log it, print one line
  local name=$1; shift
  local started=$SECONDS
  if timeout "$PART_LIMIT" "$@" >"$OUT/$name.log" 2>&1; then status=ok; else status=FAILED; failed=1; fi
  printf '%-24s %-6s %4ds  %s\n' "$name" "$status" $((SECONDS - started)) "$(python3 benchmarks/gpu_check_summary.py "$OUT/$name.log")"
}

python3 -c 'import sys, torch, timm, optuna, atm_cli
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, timm {timm.__version__}, optuna {optuna.__version__}, {gpu}")' \
  | tee "$OUT/versions.txt"
part tests-cuda python3 -m pytest -q -m cuda tests
data=()
[ -f .cache/imagenet-val-sample.tar.gz ] && data=(--data .cache/imagenet-val-sample.tar.gz)
part speed python3 benchmarks/engine.py "${data[@]}" --device "$DEVICE" \
  --models "${MODELS:-deit_small_patch16_224,deit_base_patch16_224}" --batch-sizes "${BATCH_SIZES:-1,8,64,256}" \
  --precisions "$PRECISIONS" --rounds 5 --batches 3 --json "$OUT/speed.json"
# The compiled engine path (issue 19): eager and compiled side by side; COMPILED_BATCH_SIZES, COMPILED_PRECISIONS widen it.
part speed-compiled python3 benchmarks/engine.py "${data[@]}" --device "$DEVICE" \
  --models deit_small_patch16_224 --batch-sizes "${COMPILED_BATCH_SIZES:-1,64}" \
  --precisions "${COMPILED_PRECISIONS:-bf16}" --compile both --rounds 5 --batches 3 --json "$OUT/speed-compiled.json"
part host-overhead bash -c "cd benchmarks && python3 host_overhead.py --compile no --json ../$OUT/host-overhead.json"
for precision in ${PRECISIONS//,/ }; do
  part "eval-$precision" python3 -m atm_cli eval --device "$DEVICE" --precision "$precision" --json
  part "calibrate-$precision" python3 -m atm_cli calibrate --target-reduction 25 --n-trials 5 --device "$DEVICE" \
    --precision "$precision" --json
  part "stress-$precision" python3 -m atm_cli stress --limit 500 --device "$DEVICE" --precision "$precision" --json
done
# Issue 21 on the GPU: a speed goal, the latency model timed on this device (cached in $OUT).
part calibrate-speed python3 -m atm_cli calibrate --target-speedup 1.3 --n-trials 5 --batch-size 64 \
  --device "$DEVICE" --precision "${SPEED_PRECISION:-bf16}" --cache-dir "$OUT/latency" --json
cat "$OUT/speed.log" "$OUT/speed-compiled.log"
exit $failed
