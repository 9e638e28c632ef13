#!/usr/bin/env bash
# Recalibrates the embedded model's bundled presets (run it after retraining the model): tuned on
# the 1,000 bundled calibration images, reported on the 2,000 bundled test images, 30 trials, seed 0.
set -euo pipefail
cd "$(dirname "$0")/.."
# theta_min up to 0.99, above the paper's range (<= 0.945): on this model every setting in the
# paper's range merges away at least 38% of the GFLOPs, and none keeps the unmerged top-1.
wider="--theta-min-range 0.8,0.99"
# A budget of 80% of the GFLOPs finds the 70% setting, and 90% the no-drop one, so they are not shipped.
atm calibrate --target-reduction 30 $wider --out presets/atm-demo-gflops-70.yaml
# The shipped no-drop preset (1.0/0.04/0.99) was made by this line before the futility test; it now
# finds 1.0/0.03/0.985, one test image below the unmerged top-1 (README, Presets).
atm calibrate --no-drop $wider --out presets/atm-demo-no-drop.yaml
sed -i 's/^default: false$/default: true/' presets/atm-demo-no-drop.yaml  # what `atm eval` runs by default
