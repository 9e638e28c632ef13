#!/usr/bin/env bash
# Regenerates the README's "Stress test and pictures" figures on the embedded default model.
# Needs the plot extra (pip install -e '.[plot]'); about 4 minutes on two idle CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
out=docs/images
mkdir -p "$out"
eval_dir=atm_cli/samples/cifar10-eval

# simple to busy, as the paper's Fig. 7 orders them
atm visualize "$eval_dir"/airplane/0097.jpg "$eval_dir"/frog/0319.jpg "$eval_dir"/horse/0003.jpg \
    "$eval_dir"/automobile/0000.jpg "$eval_dir"/ship/0807.jpg "$eval_dir"/truck/0819.jpg --with-tome \
    --out "$out"/merged-regions.png
atm probe --limit 256 --plot "$out"/probe.png
atm compare --limit 1000 --n-trials 15 --budgets 90,80,70,60 --plot "$out"/compare.png
atm stress --limit 500  # its table goes into the README by hand
atm eval --limit 500 --plot "$out"/tokens-per-block.png
