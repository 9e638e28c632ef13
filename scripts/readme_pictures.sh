#!/usr/bin/env bash
# Regenerates the README's "Stress test and pictures" figures on the embedded default model.
# Needs the plot extra (pip install -e '.[plot]'); takes about an hour on two busy CPU cores.
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
atm compare --limit 300 --n-trials 15 --budgets 90,80,70,60 --plot "$out"/compare.png
atm stress --limit 500  # its table goes into the README by hand
python - "$out"/tokens-per-block.png <<'PY'
import sys
from atm_cli.analysis.visualize import plot_eval_tokens
from atm_cli.cli.method_options import MethodFlags
from atm_cli.evaluation import DEMO_EVAL_DATA, evaluate, load_image_folder, load_model

loaded = load_model()
method = MethodFlags().resolve(loaded.name).config
report = evaluate(loaded, load_image_folder(DEMO_EVAL_DATA, loaded, limit=500), method, batch_size=128, workers=0)
plot_eval_tokens(report, method, sys.argv[1])
PY
