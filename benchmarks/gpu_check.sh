#!/usr/bin/env bash
# The GPU check (issue 12): under 8 minutes on one H100/H200-class GPU.
#   1. the tests marked `cuda`;  2. atm eval, atm calibrate --n-trials 5 and atm stress --limit 500 on the
#   embedded model with --device cuda in fp32, bf16 and fp16;  3. the speed benchmark (benchmarks/engine.py).
# One summary line per part; the exit status is non-zero when any part failed. Logs and JSON go to $OUT
# (default: runs/gpu-check).
#
# The GPU machines have torch, torchvision, timm, typer, rich, pyyaml and safetensors but no package index:
# atm runs from this checkout (no install), and Optuna with what it needs travels as wheels in .whl/
# (make them with benchmarks/gpu_wheels.sh on a machine with an index).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
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
  if "$@" >"$OUT/$name.log" 2>&1; then status=ok; else status=FAILED; failed=1; fi
  printf '%-24s %-6s %4ds  %s\n' "$name" "$status" $((SECONDS - started)) "$(tail -n 1 "$OUT/$name.log" | cut -c1-90)"
}

part tests-cuda python3 -m pytest -q -m cuda tests
for precision in fp32 bf16 fp16; do
  part "eval-$precision" python3 -m atm_cli eval --device cuda --precision "$precision" --json
  part "calibrate-$precision" python3 -m atm_cli calibrate --target-reduction 25 --n-trials 5 --device cuda \
    --precision "$precision" --json
  part "stress-$precision" python3 -m atm_cli stress --limit 500 --device cuda --precision "$precision" --json
done
part speed python3 benchmarks/engine.py --device cuda --models deit_small_patch16_224,deit_base_patch16_224 \
  --batch-sizes 1,8,64,256 --precisions fp32,bf16,fp16 --rounds 5 --batches 3 --json "$OUT/speed.json"
cat "$OUT/speed.log"
exit $failed
