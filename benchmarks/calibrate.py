"""Do calibration choices hold on new images, and what does a search cost? The paired rule against the argmax.

    python benchmarks/calibrate.py [--seeds 5] [--n-trials 30] [--limit N] [--test-limit N] [--goals LIST]

On the embedded default model: each search tunes on the bundled calibration images (the first
`--limit` of them, class balanced) and the setting each rule chooses from the same study is
measured on the bundled test images. Goals: a 25% GFLOPs cut (budget), no top-1 drop (no-drop),
and 99% agreement with the unmerged model's classes, tuned without labels (agreement). Per goal
and rule: held-out top-1, agreement and GFLOPs, mean (and spread) over the seeds; per search,
the images the study ran through the model against a naive search's (every trial on every image,
plus the unmerged model each time).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import optuna

from atm_cli.calibration import AgreementGoal, BudgetGoal, NoDropGoal, RangeFlags, Search, seed_constant
from atm_cli.calibration.calibrate import PROBE_BATCHES
from atm_cli.calibration.study import open_study
from atm_cli.evaluation import (DEMO_CALIB_DATA, DEMO_EVAL_DATA, Workload, agreement, load_image_folder, load_model,
                                load_unlabelled_images, preload)

GOALS = ("budget", "no-drop", "agreement")


def goal_of(name: str, unmerged_gflops: float):
    return {"budget": lambda: BudgetGoal(0.75 * unmerged_gflops), "no-drop": lambda: NoDropGoal(0.0),
            "agreement": lambda: AgreementGoal(agreement=99.0)}[name]()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--n-trials", type=int, default=30)
    parser.add_argument("--limit", type=int, default=None, help="calibration images (default: all 1,000)")
    parser.add_argument("--test-limit", type=int, default=None, help="test images (default: all 2,000)")
    parser.add_argument("--goals", default=",".join(GOALS))
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)

    loaded = load_model(device="auto")
    test = Workload(loaded, preload(load_image_folder(DEMO_EVAL_DATA, loaded, limit=args.test_limit),
                                    args.batch_size, device=loaded.device))
    test_unmerged = test.baseline
    rows, costs = [], []
    tuning = {}  # per goal: its images (unlabelled for the label-free goal), ranges and unmerged results
    for name in args.goals.split(","):
        goal = goal_of(name, loaded.unmerged_gflops)
        load = load_unlabelled_images if goal.label_free else load_image_folder
        images = load(DEMO_CALIB_DATA, loaded, limit=args.limit).in_fixed_random_order()  # as atm calibrate
        tune = Workload(loaded, preload(images, args.batch_size, device=loaded.device))
        tuning[name] = goal, tune, RangeFlags().resolve(tune), tune.baseline
    for seed in range(args.seeds):  # seeds outermost: a run cut short has every goal for the seeds it finished
        for name, (goal, tune, space, reference) in tuning.items():
            started = time.perf_counter()
            search = Search(tune, reference, goal, space, PROBE_BATCHES, "paired")
            study = open_study(None, None, goal, {}, seed, args.n_trials)
            seed_constant(search, study, args.n_trials)
            result = search.run(study, args.n_trials)
            costs.append({"goal": name, "seed": seed, "images": result.n_images,
                          "study_forward_passes": result.study_forward_passes + len(tune.batches[0][1]),
                          "naive_forward_passes": result.naive_forward_passes,
                          "seconds": time.perf_counter() - started})
            for rule, chosen in (("paired", result.best), ("argmax", result.argmax)):
                if chosen is None:
                    rows.append({"goal": name, "seed": seed, "rule": rule, "found": False})
                    continue
                held_out = test.run(space.config(chosen.params))
                rows.append({"goal": name, "seed": seed, "rule": rule, "found": True, "trial": chosen.number,
                             "tuning_top1": chosen.top1, "tuning_gflops": chosen.gflops,
                             "top1": held_out.top1, "gflops": held_out.gflops,
                             "agreement": agreement(held_out, test_unmerged)})
            print(json.dumps({"rows": rows[-2:], "cost": costs[-1]}), flush=True)
    summary = []
    for name in args.goals.split(","):
        for rule in ("paired", "argmax"):
            found = [r for r in rows if r["goal"] == name and r["rule"] == rule and r["found"]]
            if not found:
                continue

            def mean(key: str) -> float:
                return statistics.fmean(r[key] for r in found)

            def spread(key: str) -> float:
                return statistics.pstdev(r[key] for r in found)

            summary.append({"goal": name, "rule": rule, "found": f"{len(found)}/{args.seeds}",
                            "top1": mean("top1"), "top1_sd": spread("top1"), "agreement": mean("agreement"),
                            "gflops": mean("gflops"), "gflops_sd": spread("gflops")})
    share = [c["study_forward_passes"] / c["naive_forward_passes"] for c in costs]
    print(json.dumps({"unmerged_top1": test_unmerged.top1, "unmerged_gflops": test_unmerged.gflops,
                      "test_images": test_unmerged.n_images, "summary": summary,
                      "cost_share_min": min(share), "cost_share_max": max(share), "costs": costs}))


if __name__ == "__main__":
    main()
