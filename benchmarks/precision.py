"""Do the demo presets keep their token counts under bfloat16 autocast? Per batch and per block, vs float32.

    python benchmarks/precision.py [--limit 2000] [--batch-size 16]

The engine scores, thresholds and merges in float32 whatever the autocast dtype (tests/test_precision.py
shows a similarity bf16 would round across a threshold counted as float32 counts it). What remains is
the model's own bf16 arithmetic: keys and residual stream differ slightly, and a pair near a threshold
may cross it. This reports, for each bundled demo preset on the bundled test images: the share of
batches whose per-block token counts all equal float32's, the share of (batch, block) counts equal, and
top-1 at both precisions.
"""
from __future__ import annotations

import argparse

import torch

from atm_cli.engine import last_trace, merging
from atm_cli.evaluation import DEMO_EVAL_DATA, load_image_folder, load_model, preload
from atm_cli.presets import list_presets


def run(model, batches, config, dtype):
    merged, correct = [], 0
    with torch.inference_mode(), merging(model, config):
        for images, labels in batches:
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                correct += (model(images).argmax(dim=1) == labels).sum().item()
            merged.append(last_trace(model).merged)
    return merged, 100.0 * correct / sum(len(labels) for _, labels in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    demo = load_model(device="cpu")
    batches = preload(load_image_folder(DEMO_EVAL_DATA, demo, limit=args.limit), args.batch_size)
    for preset in list_presets(demo.name):
        (full, top1_full), (half, top1_half) = (run(demo.model, batches, preset.method, dtype)
                                                for dtype in (torch.float32, torch.bfloat16))
        batches_equal = sum(a == b for a, b in zip(full, half)) / len(full)
        pairs = [(u, v) for a, b in zip(full, half) for u, v in zip(a, b)]
        blocks_equal = sum(u == v for u, v in pairs) / len(pairs)
        print(f"{preset.name}: {len(full)} batches of {args.batch_size}; all blocks equal on {100 * batches_equal:.1f}% "
              f"of batches, {100 * blocks_equal:.1f}% of (batch, block) counts; top-1 fp32 {top1_full:.2f}, "
              f"bf16 {top1_half:.2f}")


if __name__ == "__main__":
    main()
