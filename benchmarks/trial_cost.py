"""What a calibration trial costs: `atm calibrate`'s seconds per trial and images per second, on the bundled images.

    OMP_NUM_THREADS=1 python benchmarks/trial_cost.py [--tree DIR ...] [--n-trials 10] [--batch-size 64]
                                                      [--target-reduction 30] [--repeats 2]

Runs `atm calibrate --target-reduction P --json` on the embedded default model (atm-demo: tuned on the 1,000
bundled calibration images, reported on the 2,000 bundled test images) from each source tree given (default:
this checkout; another, such as a `git worktree` of an older commit, runs from its own folder, first on
PYTHONPATH), the trees alternating, `--repeats` rounds. Each trial is timed where Optuna calls it
(`Search.objective`, wrapped here: the seed, the bundled presets and the sampled settings alike, pruned or
not): per trial, their mean; images per second, the images the study ran through the model
(`study_forward_passes`) over their sum. The command's wall time (loading, ranges, seeding, the report) is
given beside. Medians over the rounds; the ratio is each tree's time per trial over the first tree's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAME_SEARCH = ("trials_run", "trials_pruned", "best_trial", "study_forward_passes")  # equal across trees
# `atm calibrate` with each trial timed, run in the tree's own process; the times go to the file $TRIAL_TIMES.
DRIVER = """
import atexit, json, os, sys, time
from atm_cli.calibration.search import Search
from atm_cli.cli.app import main

seconds, objective = [], Search.objective

def timed(self, trial):
    start = time.perf_counter()
    try:
        return objective(self, trial)
    finally:
        seconds.append(time.perf_counter() - start)

Search.objective = timed
atexit.register(lambda: open(os.environ["TRIAL_TIMES"], "w").write(json.dumps(seconds)))
sys.argv = ["atm", *sys.argv[1:]]
main()
"""


def run(tree: Path, args: argparse.Namespace) -> dict:
    """One `atm calibrate` from `tree`: its wall time, each trial's seconds and its --json."""
    flags = ["calibrate", "--target-reduction", str(args.target_reduction), "--n-trials", str(args.n_trials),
             "--batch-size", str(args.batch_size), "--seed", "0", "--json"]
    with tempfile.NamedTemporaryFile(suffix=".json") as times:
        env = {**os.environ, "PYTHONPATH": str(tree), "TRIAL_TIMES": times.name,
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", DRIVER, *flags], cwd=tree, env=env, capture_output=True,
                              text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"{tree}: exit {done.returncode}\n{done.stderr}")
        trials = json.loads(Path(times.name).read_text())
    result = json.loads(done.stdout)
    return {"wall": wall, "per_trial": statistics.mean(trials),
            "images_per_second": result["study_forward_passes"] / sum(trials),
            "search": {key: result[key] for key in SAME_SEARCH}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, action="append", help="a source tree (repeatable; default: this one)")
    parser.add_argument("--n-trials", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--target-reduction", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    trees = [tree.resolve() for tree in args.tree or [REPO]]

    rounds: dict[Path, list[dict]] = {tree: [] for tree in trees}
    for round_ in range(args.repeats):
        for tree in trees:
            row = run(tree, args)
            rounds[tree].append(row)
            print(f"round {round_ + 1}, {tree}: {row['per_trial']:.3f} s per trial, "
                  f"{row['images_per_second']:.0f} images/s, {row['wall']:.1f} s for the command; {row['search']}",
                  flush=True)

    first = statistics.median(row["per_trial"] for row in rounds[trees[0]])
    for tree in trees:
        rows = rounds[tree]
        per_trial = statistics.median(row["per_trial"] for row in rows)
        print(f"{tree}: {per_trial:.3f} s per trial, "
              f"{statistics.median(row['images_per_second'] for row in rows):.0f} images/s, "
              f"{statistics.median(row['wall'] for row in rows):.1f} s for the command (medians of {len(rows)}); "
              f"{per_trial / first:.2f}x the first tree's time per trial")
    searches = {json.dumps(row["search"], sort_keys=True) for rows in rounds.values() for row in rows}
    if len(searches) > 1:
        print(f"note: the trees ran different searches: {sorted(searches)}")


if __name__ == "__main__":
    main()
