"""ATM under static shapes: how many token-count shapes ATM meets, and what rounding r to a multiple g costs.

    python benchmarks/atm_shapes.py [--multiples 1,2,4,8] [--batch-size 64] [--imagenet-limit 640]
                                    [--data FILE_OR_FOLDER] [--order shuffled|folder] [--parts demo,imagenet]
                                    [--json FILE]

ATM's r in each block is the floor of the batch mean of per-image counts above the block's threshold,
so a compiled model (`atm_cli.engine.compiled`: one segment per distinct (block, tokens in, r)) compiles
anew whenever the data moves r. `ATMConfig(r_multiple=g)` rounds every block's r down to a multiple of
g. For each g this runs, eagerly (shapes are decided by the data, not by the compiler):

- demo: the embedded model on the 2,000 bundled test images, with its default preset
  (`atm-demo-no-drop`) and with `atm-demo-gflops-70`;
- imagenet: a random-weight `deit_small_patch16_224` (seed 0) on the shared ImageNet validation sample
  (`../shared/data/imagenet-val-sample.tar.gz`, unpacked into a temporary folder, or `--data` a folder
  unpacked once, e.g. `.cache/imagenet-val-sample`), a class-balanced subset of `--imagenet-limit`
  images (a batch of 64 takes DeiT-S 5 to 15 s on 2 CPU cores; the whole run: 11 CPU-minutes),
  with the ATM setting that `benchmarks/engine.py`'s `atm_for` finds for about 30% fewer GFLOPs on
  the first batch.

Token buckets (`--buckets`): the compiled path's answer that keeps the paper's r. The exact
setting (g = 1) is compiled (`compile_patched(token_bucket=P)`, `--backend`: aot_eager captures and
guards as inductor does, without code generation) and run over the same full batches: graphs compiled
in all and first in the second half (0: none new), whether every batch's token counts equal the eager
run's, and the padding's cost: tokens through the blocks with padding over those without.

The images run in one fixed pseudo-random order (`--order folder`: the folder's, whose batches hold one
or two classes), batch `--batch-size`. Per setting and g: distinct (block, tokens in, r) shapes and
distinct whole token-count sequences over the full batches (the compiled model runs a short last batch
eagerly), how many of them first appear in the second half of those batches (0: the count saturated),
GFLOPs per image, and top-1 (demo) or agreement with the unmerged model's top-1 predictions (random
weights, where top-1 means nothing), each against g = 1. `r` of a block is the tokens it removes
(tokens in minus tokens out; in the last block of a class-token model, every token but the prefix).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from atm_cli.engine import ATMConfig, last_trace, patch
from atm_cli.engine.compiled import compile_patched
from atm_cli.evaluation import (DEMO_EVAL_DATA, Outcomes, Workload, agreement, load_image_folder, load_model,
                                preload)
from atm_cli.presets import default_preset_for, find_preset
from engine import DEFAULT_DATA, atm_for, unpacked  # benchmarks/engine.py: the same ~30% ATM setting search

DEMO_PRESETS = ("atm-demo-gflops-70",)  # besides the model's default preset


def block_shapes(outcome) -> list[tuple[int, int, int]]:
    """(block, tokens in, r) of every block of one batch."""
    counts = (*outcome.tokens, outcome.tokens_left)
    return [(block, counts[block], counts[block] - counts[block + 1]) for block in range(len(outcome.tokens))]


def shape_counts(run: Outcomes, batch_size: int) -> dict:
    """Distinct shapes and token-count sequences over the full batches, and how many first appear in the second half."""
    full = [outcome for outcome in run.batches if outcome.n == batch_size]
    half = (len(full) + 1) // 2
    shapes = [set(block_shapes(outcome)) for outcome in full]
    sequences = [(*outcome.tokens, outcome.tokens_left) for outcome in full]
    first_shapes = set().union(*shapes[:half])
    all_shapes = set().union(*shapes)
    per_block: dict[int, set[int]] = {}
    for block, _, r in all_shapes:
        per_block.setdefault(block, set()).add(r)
    return {"full_batches": len(full), "first_half_batches": half,
            "shapes": len(all_shapes), "shapes_first_half": len(first_shapes),
            "new_shapes_second_half": len(all_shapes - first_shapes),
            "sequences": len(set(sequences)), "sequences_first_half": len(set(sequences[:half])),
            "new_sequences_second_half": len(set(sequences) - set(sequences[:half])),
            "r_values_per_block": [sorted(per_block.get(block, ())) for block in range(len(full[0].tokens))] if full else []}


def run_multiples(workload: Workload, base: ATMConfig, multiples: list[int], batch_size: int, labelled: bool,
                  console: Console, label: str) -> list[dict]:
    rows = []
    baseline = workload.baseline
    for multiple in multiples:
        config = dataclasses.replace(base, r_multiple=multiple)
        start = time.perf_counter()
        with torch.inference_mode():
            run = workload.run(config)
        row = {"setting": label, "r_multiple": multiple, "params": config.to_params(), "n_images": run.n_images,
               "gflops": run.gflops, "baseline_gflops": baseline.gflops,
               "gflops_reduction": 100.0 * (1.0 - run.gflops / baseline.gflops),
               "top1": run.top1 if labelled else None, "baseline_top1": baseline.top1 if labelled else None,
               "agreement": agreement(run, baseline), "seconds": time.perf_counter() - start,
               **shape_counts(run, batch_size)}
        console.print(f"  {label} g={multiple}: {row['shapes']} shapes, {row['sequences']} sequences, "
                      f"{row['gflops']:.4f} GFLOPs, {row['seconds']:.0f} s", highlight=False)
        rows.append(row)
    first = rows[0]
    for row in rows:  # against g = 1 (the first multiple asked for)
        row["gflops_vs_first"] = 100.0 * (row["gflops"] / first["gflops"] - 1.0)
        row["top1_vs_first"] = None if row["top1"] is None else row["top1"] - first["top1"]
        row["agreement_vs_first"] = row["agreement"] - first["agreement"]
    return rows


def padded_length(tokens: int, bucket: int, limit: int) -> int:
    return min(-(-tokens // bucket) * bucket, limit)


def run_buckets(workload: Workload, config: ATMConfig, eager: Outcomes, buckets: list[int], batch_size: int,
                backend: str, console: Console, label: str) -> list[dict]:
    """Each token bucket's compiled run of `config` over the full batches, against the eager run `eager`."""
    full = [(images, outcome) for (images, _), outcome in zip(workload.batches, eager.batches) if outcome.n == batch_size]
    half = (len(full) + 1) // 2
    real = sum(sum(outcome.tokens[1:]) + outcome.tokens_left for _, outcome in full)
    rows = []
    for bucket in buckets:
        torch._dynamo.reset()
        view = patch(copy.copy(workload.loaded.model), config)
        compiled = compile_patched(view, backend=backend, token_bucket=bucket)
        variants, same_tokens, start = [], True, time.perf_counter()
        with torch.inference_mode():
            for images, outcome in full:
                compiled(images)
                trace = last_trace(view)
                same_tokens &= tuple(trace.tokens[:-1]) == outcome.tokens and trace.tokens[-1] == outcome.tokens_left
                variants.append(compiled.variants)
        padded = sum(sum(padded_length(n, bucket, outcome.tokens[0]) for n in (*outcome.tokens[1:], outcome.tokens_left))
                     for _, outcome in full)
        row = {"setting": label, "token_bucket": bucket, "backend": backend, "full_batches": len(full),
               "graphs": variants[-1], "new_graphs_second_half": variants[-1] - variants[half - 1],
               "graphs_per_batch": variants, "same_tokens_as_eager": same_tokens,
               "padded_over_real_tokens": padded / real, "seconds": time.perf_counter() - start}
        console.print(f"  {label} bucket {bucket}: {row['graphs']} graphs ({row['new_graphs_second_half']} new in the "
                      f"second half), tokens {'equal' if same_tokens else 'DIFFER'}, padding "
                      f"{100 * (row['padded_over_real_tokens'] - 1):+.1f}% tokens, {row['seconds']:.0f} s",
                      highlight=False)
        rows.append(row)
    return rows


def ordered(images, order: str):
    return images.in_fixed_random_order() if order == "shuffled" else images


def demo_part(args, console: Console) -> list[dict]:
    loaded = load_model(device="cpu")
    images = ordered(load_image_folder(DEMO_EVAL_DATA, loaded), args.order)
    workload = Workload(loaded, preload(images, args.batch_size), images.source)
    default = default_preset_for(loaded.name, loaded.checkpoint_sha256)
    presets = [default] + [find_preset(name, loaded.name, checkpoint_sha256=loaded.checkpoint_sha256)
                           for name in DEMO_PRESETS if name != default.name]
    console.print(f"demo: {loaded.name}, {workload.n_images} images, batch {args.batch_size}", highlight=False)
    rows = []
    for preset in presets:
        for row in run_multiples(workload, preset.method, args.multiples, args.batch_size, True, console, preset.name):
            rows.append({"part": "demo", "model": loaded.name, "data": images.source, **row})
        add_bucket_rows(args, workload, preset.method, console, preset.name)
    return rows


def add_bucket_rows(args, workload: Workload, config: ATMConfig, console: Console, label: str) -> None:
    if args.buckets:
        exact = dataclasses.replace(config, r_multiple=1)
        with torch.inference_mode():
            eager = workload.run(exact)
        args.bucket_rows += [{"model": workload.loaded.name, **row} for row in run_buckets(
            workload, exact, eager, args.buckets, args.batch_size, args.backend, console, label)]


def imagenet_part(args, console: Console) -> list[dict]:
    torch.manual_seed(0)
    loaded = load_model("deit_small_patch16_224", pretrained=False, device="cpu")
    folder = unpacked(args.data)
    try:
        images = ordered(load_image_folder(folder, loaded, limit=args.imagenet_limit), args.order)
        workload = Workload(loaded, preload(images, args.batch_size), str(args.data))
    finally:
        if not args.data.is_dir():  # the archive's temporary copy: every image is in memory now
            shutil.rmtree(folder.parent, ignore_errors=True)
    target = loaded.unmerged_gflops * (1.0 - args.reduction)
    start = time.perf_counter()
    with torch.inference_mode():
        found = atm_for(loaded.model, workload.batches[0][0], target)
    console.print(f"imagenet: {loaded.name} (random weights), {workload.n_images} images, batch {args.batch_size}; "
                  f"ATM for {target:.3f} GFLOPs: {found.to_params()} ({time.perf_counter() - start:.0f} s)",
                  highlight=False)
    label = f"ATM theta_min {found.theta_min:g} (~{100 * args.reduction:.0f}%)"
    rows = [{"part": "imagenet", "model": loaded.name, "data": str(args.data), **row}
            for row in run_multiples(workload, found, args.multiples, args.batch_size, False, console, label)]
    add_bucket_rows(args, workload, found, console, label)
    return rows


def table_of(rows: list[dict], args) -> Table:
    table = Table(title=f"ATM shapes per r multiple g, batch {args.batch_size}, {args.order} order, CPU, "
                        f"torch {torch.__version__}", title_justify="left")
    for column in ("model", "setting", "g", "images", "shapes", "new 2nd half", "sequences", "new 2nd half ",
                   "GFLOPs/image", "vs g=1", "top-1 / agreement", "vs g=1 "):
        table.add_column(column, justify="left" if column in ("model", "setting") else "right")
    for row in rows:
        where = "atm-demo" if row["part"] == "demo" else "DeiT-S random"
        quality = (f"{row['top1']:.2f} (unmerged {row['baseline_top1']:.2f})" if row["top1"] is not None
                   else f"{row['agreement']:.2f}% agree")
        quality_delta = row["top1_vs_first"] if row["top1"] is not None else row["agreement_vs_first"]
        table.add_row(where, row["setting"], str(row["r_multiple"]), str(row["n_images"]), str(row["shapes"]),
                      str(row["new_shapes_second_half"]), str(row["sequences"]), str(row["new_sequences_second_half"]),
                      f"{row['gflops']:.4f} ({-row['gflops_reduction']:+.1f}%)", f"{row['gflops_vs_first']:+.1f}%",
                      quality, f"{quality_delta:+.2f}")
    return table


def bucket_table(rows: list[dict], args) -> Table:
    table = Table(title=f"ATM compiled with token buckets (g = 1, the paper's r), batch {args.batch_size}, "
                        f"backend {args.backend}", title_justify="left")
    for column in ("model", "setting", "bucket", "batches", "graphs", "new 2nd half", "tokens as eager",
                   "padding cost"):
        table.add_column(column, justify="left" if column in ("model", "setting") else "right")
    for row in rows:
        table.add_row(row["model"], row["setting"], str(row["token_bucket"]), str(row["full_batches"]),
                      str(row["graphs"]), str(row["new_graphs_second_half"]),
                      "yes" if row["same_tokens_as_eager"] else "NO",
                      f"{100 * (row['padded_over_real_tokens'] - 1):+.1f}% tokens")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--multiples", default="1,2,4,8", help="values of r_multiple (g); the first is the reference")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--parts", default="demo,imagenet")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the ImageNet sample: archive or folder")
    parser.add_argument("--imagenet-limit", type=int, default=640, help="ImageNet images (class-balanced subset)")
    parser.add_argument("--reduction", type=float, default=0.30, help="GFLOPs cut of the ImageNet ATM setting")
    parser.add_argument("--order", choices=("shuffled", "folder"), default="shuffled")
    parser.add_argument("--buckets", default="8,16", help="token buckets to compile with (demo part; empty: none)")
    parser.add_argument("--backend", default="aot_eager", help="torch.compile backend for the token buckets")
    parser.add_argument("--json", type=Path, help="also write every row as JSON (after each part)")
    args = parser.parse_args()
    args.multiples = [int(m) for m in args.multiples.split(",")]
    args.buckets = [int(b) for b in args.buckets.split(",") if b]
    args.bucket_rows = []

    console = Console(width=200)
    parts = {"demo": demo_part, "imagenet": imagenet_part}
    rows: list[dict] = []
    start = time.perf_counter()
    for name in args.parts.split(","):
        rows.extend(parts[name](args, console))
        if args.json:  # a run cut short keeps what it measured
            args.json.write_text(json.dumps({"batch_size": args.batch_size, "order": args.order,
                                             "torch": torch.__version__, "rows": rows,
                                             "bucket_rows": args.bucket_rows}, indent=1) + "\n")
    console.print(table_of(rows, args))
    if args.bucket_rows:
        console.print(bucket_table(args.bucket_rows, args))
    console.print(f"{time.perf_counter() - start:.0f} s in all", highlight=False)


if __name__ == "__main__":
    main()
