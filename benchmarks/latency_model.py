"""The latency model's prediction error: predicted vs measured model time for a spread of settings.

For each model, the latency model is measured afresh (not read from a cache) on one batch of real
images: the block table, then each method's step cost fitted on a few settings (`FIT`). It then
predicts settings it was not fitted on (`CHECK`: ATM and ToMe at several strengths, and the
unmerged model), which are timed for real on the same batch, interleaved with the unmerged model
(median of repeats). Reported per setting: predicted and measured seconds per batch, and predicted
and measured speedup over the unmerged model; then the mean and largest absolute errors.

On a shared machine absolute times drift with the load between the table and the check; speedups,
measured side by side, do not: the speedup error is the figure that calibration relies on.

    python benchmarks/latency_model.py                    # atm-demo (batch 64) and a random DeiT-S (batch 16)
    python benchmarks/latency_model.py --models atm-demo --repeats 9 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import tarfile
import tempfile
from pathlib import Path

import torch

from atm_cli.engine import ATMConfig, ToMeConfig
from atm_cli.evaluation import load_image_folder, load_model, preload
from atm_cli.evaluation.data import DEMO_CALIB_DATA
from atm_cli.evaluation.latency import device_latency, measure_speedups

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_ARCHIVE = ROOT.parent / "shared" / "data" / "imagenet-val-sample.tar.gz"
IMAGENET = ROOT / ".cache" / "imagenet-val-sample"
BATCH = {"atm-demo": 64, "deit_small_patch16_224": 16}
# Fitted on: constant thresholds and ToMe's r at two strengths each (what calibration fits on is alike).
FIT = {"atm": [ATMConfig.constant(t) for t in (0.95, 0.85, 0.75)], "tome": [ToMeConfig(r=r) for r in (2, 6)]}
CHECK = {
    "atm-demo": [ATMConfig(0.985, 0.045, 0.88), ATMConfig.constant(0.9), ATMConfig.constant(0.8),
                 ATMConfig(0.95, 0.05, 0.7), ToMeConfig(r=1), ToMeConfig(r=3), ToMeConfig(r=4)],
    "deit_small_patch16_224": [ATMConfig(0.985, 0.045, 0.88), ATMConfig.constant(0.9), ATMConfig.constant(0.8),
                               ATMConfig(0.95, 0.05, 0.7), ToMeConfig(r=4), ToMeConfig(r=8), ToMeConfig(r=13)],
}


def imagenet_sample() -> Path:
    if not IMAGENET.is_dir():
        IMAGENET.parent.mkdir(exist_ok=True)
        with tarfile.open(IMAGENET_ARCHIVE) as tar:
            tar.extractall(IMAGENET.parent, filter="data")
    return IMAGENET


def label(config) -> str:
    if config is None:
        return "unmerged"
    return f"{config.NAME} " + ", ".join(f"{k}={v:g}" for k, v in config.to_params().items()
                                         if k in ("alpha", "beta", "theta_min", "r"))


def run(name: str, repeats: int) -> list[float]:
    demo = name == "atm-demo"
    loaded = load_model(name, pretrained=demo, device="cpu")
    images = load_image_folder(DEMO_CALIB_DATA if demo else imagenet_sample(), loaded, limit=BATCH[name])
    batch = preload(images, BATCH[name])[0][0]
    with tempfile.TemporaryDirectory() as fresh:
        latency = device_latency(loaded, batch, FIT, folder=fresh)
    settings = CHECK[name]
    speeds = measure_speedups(loaded, batch, settings, repeats)
    depth = len(loaded.model.blocks)
    unmerged = latency.unmerged_seconds(depth)
    print(f"\n{loaded.name}, batch {BATCH[name]}, {latency.key.device}, {latency.key.precision}; "
          f"table scale {latency.scale:.3f}; steps: " +
          ", ".join(f"{m} {1e3 * c.per_block:.2f} ms/block + {1e6 * c.per_token:.2f} us/token"
                    for m, c in latency.steps.items()))
    print(f"{'setting':<42}{'tokens left':>12}{'pred ms':>9}{'meas ms':>9}{'err':>7}"
          f"{'pred x':>8}{'meas x':>8}{'spread':>13}{'err':>7}")
    baseline_measured = statistics.median(s.baseline_seconds for s in speeds)
    error = (unmerged - baseline_measured) / baseline_measured
    print(f"{'unmerged':<42}{loaded.unmerged_tokens[-1]:>12}{1e3 * unmerged:>9.1f}{1e3 * baseline_measured:>9.1f}"
          f"{100 * error:>+6.1f}%")
    errors = []
    for config, speed in zip(settings, speeds):
        predicted = latency.predict_seconds(speed.tokens, config.NAME)
        speedup = unmerged / predicted
        time_error = (predicted - speed.seconds) / speed.seconds
        speed_error = (speedup - speed.speedup) / speed.speedup
        errors.append(abs(speed_error))
        print(f"{label(config):<42}{speed.tokens[-1]:>12}{1e3 * predicted:>9.1f}{1e3 * speed.seconds:>9.1f}"
              f"{100 * time_error:>+6.1f}%{speedup:>8.3f}{speed.speedup:>8.3f}"
              f"{f'{speed.speedup_low:.2f}-{speed.speedup_high:.2f}':>13}{100 * speed_error:>+6.1f}%")
    print(f"speedup error over {len(errors)} settings: mean {100 * statistics.mean(errors):.1f}%, "
          f"largest {100 * max(errors):.1f}%")
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(BATCH), choices=list(BATCH))
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds of the real timing")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch's CPU threads (on a shared, oversubscribed machine 1 is faster and steadier: "
                             "threads that wait for each other wait for the busiest core)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        run(name, args.repeats)


if __name__ == "__main__":
    main()
