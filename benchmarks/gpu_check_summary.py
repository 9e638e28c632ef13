"""One line for a part of benchmarks/gpu_check.sh: the headline figures of its JSON result (atm eval,
calibrate, stress), or the log's last line for anything else."""
from __future__ import annotations

import json
import sys


def headline(result: dict) -> str:
    if "methods" in result:  # atm stress
        saved = [f"{m['method']} {m['gflops_change']:+.0f}%" if m["passed"] else f"{m['method']} none"
                 for m in result["methods"]]
        return f"unmerged {result['baseline_top1']:.2f}%; no-drop GFLOPs: " + ", ".join(saved)
    figures = (f"top-1 {result['top1']:.2f}% (unmerged {result['baseline_top1']:.2f}%), "
               f"GFLOPs -{result['gflops_reduction']:.1f}%, agreement {result['agreement']:.1f}%")
    if "images_per_sec" in result:  # atm eval
        figures += f", {result['images_per_sec']:.0f} img/s (unmerged {result['baseline_images_per_sec']:.0f})"
    if "trials_run" in result:  # atm calibrate
        figures += f", {result['trials_run']} trials"
    return figures


def main(log: str) -> None:
    lines = [line for line in open(log, errors="replace").read().splitlines() if any(c.isalnum() for c in line)]
    lines = lines or [""]  # (a table's borders skipped: its last row is the line)
    try:
        print(headline(json.loads(lines[-1])))
    except (ValueError, KeyError, TypeError):
        print(lines[-1][:110])


if __name__ == "__main__":
    main(sys.argv[1])
