"""The host-overhead proxy: what a merged forward costs beyond its arithmetic, on the CPU.

    python benchmarks/host_overhead.py [--methods tome,atm,...] [--compile no|yes|both] [--rounds 30]
                                       [--reduction 0.3] [--json FILE]

A DeiT-S-shaped model (197 tokens, 12 blocks, 6 heads) of embedding width 24 with random weights, batch 1:
its arithmetic is negligible, so its time is what a GPU forward in half precision is bound by, dispatch
and Python. Every method is set to about `--reduction` fewer GFLOPs than the unmerged model (ToMe's r, the
other rivals' knob, ATM's theta_min, on the first image) and runs, each a copy patched once, in
alternation with the unmerged model, image by image, so that machine noise hits all alike. Per forward:
top-level aten calls (torch's profiler) and host reads (`.item()`, `.tolist()`), and the median time over the rounds
as a ratio to the unmerged model's, eager against eager and compiled against compiled (`torch.compile`,
static shapes, inductor; one graph for every method but ATM, whose variants are counted). Issue targets:
eager merged <= 1.6x, compiled fixed-r methods <= 1.15x, ATM a bounded number of compiled variants.
"""
from __future__ import annotations

import os
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler, started per count, would print two lines each time

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import timm
import torch
from rich.console import Console
from rich.table import Table
from torch.profiler import ProfilerActivity, profile

from atm_cli.engine import METHODS, ATMConfig, patch
from atm_cli.engine.compiled import compile_patched
from engine import atm_for, first_fitting, gflops_of  # benchmarks/engine.py: the same settings search

PROXY = dict(embed_dim=24, num_heads=6, num_classes=10)
READS = ("item", "tolist")  # the Tensor methods that bring values to the host: on a GPU, the host waits there


def proxy_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_small_patch16_224", pretrained=False, **PROXY).eval()


def setting_for(name: str, model: torch.nn.Module, image: torch.Tensor, target: float):
    """`name` at about `target` GFLOPs on `image` (None for the unmerged model)."""
    if name == "unmerged":
        return None
    if name.startswith("atm"):
        multiple = int(name.partition("-g")[2] or 1)
        found = atm_for(model, image, target)
        return ATMConfig(**{**found.to_params(), "r_multiple": multiple})
    knob = METHODS[name].knob(len(model.blocks), model.patch_embed.num_patches)
    return first_fitting([knob.config(step) for step in range(1, knob.top + 1)], model, image, target)


def op_counts(run, image: torch.Tensor) -> tuple[int, int]:
    """(top-level aten calls, host reads: `.item()` and `.tolist()` calls) of one forward."""
    reads, originals = [0], {name: getattr(torch.Tensor, name) for name in READS}

    def counted(original):
        def read(tensor, *args, **kwargs):
            reads[0] += 1
            return original(tensor, *args, **kwargs)
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(original))
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(image)
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    events = [event for event in prof.events() if event.name.startswith("aten::")]
    top_level = [event for event in events if event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::")]
    return len(top_level), reads[0]


def measure(runs: dict, images: list[torch.Tensor], rounds: int, warm_up: int) -> dict[str, float]:
    """Median seconds per forward of each run, interleaved image by image."""
    seconds = {name: [] for name in runs}
    for round_index in range(warm_up + rounds):
        for image in images:
            for name, run in runs.items():
                start = time.perf_counter()
                run(image)
                if round_index >= warm_up:
                    seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="tome,atm,atm-g8,evit,mctf,pitome,zero-tprune")
    parser.add_argument("--compile", choices=("no", "yes", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--images", type=int, default=4, help="distinct images per round (batch 1)")
    parser.add_argument("--reduction", type=float, default=0.30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a host-bound forward: one thread, as the dispatching host thread is one

    model = proxy_model()
    generator = torch.Generator().manual_seed(0)
    images = [torch.randn(1, 3, 224, 224, generator=generator) for _ in range(args.images)]
    names = ["unmerged", *args.methods.split(",")]
    rows = []
    with torch.inference_mode():
        base = gflops_of(model, METHODS["tome"](r=0), images[0])  # r=0: the exact unmerged forward, traced
        settings = {name: setting_for(name, model, images[0], base * (1 - args.reduction)) for name in names}
        views = {name: model if config is None else patch(copy.copy(model), config) for name, config in settings.items()}
        gflops = {name: base if config is None else gflops_of(model, config, images[0]) for name, config in settings.items()}
        for compiled in {"no": [False], "yes": [True], "both": [False, True]}[args.compile]:
            torch._dynamo.reset()
            runs, compile_seconds = {}, {}
            for name, view in views.items():
                runs[name] = compile_patched(view) if compiled else view
            if compiled:  # every variant the images need, compiled before timing
                for name, run in runs.items():
                    for image in images:
                        run(image)
                    compile_seconds[name] = run.compile_seconds
            counts = {name: op_counts(run, images[0]) for name, run in runs.items()}
            medians = measure(runs, images, args.rounds, warm_up=2)
            for name in names:
                rows.append({"method": name, "compiled": compiled, "setting": None if settings[name] is None
                             else settings[name].to_params(), "gflops": gflops[name],
                             "aten_calls": counts[name][0], "host_syncs": counts[name][1],
                             "ms_per_forward": 1e3 * medians[name], "time_over_unmerged": medians[name] / medians["unmerged"],
                             "compile_seconds": compile_seconds.get(name), "variants": getattr(runs[name], "variants", None)})
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1) + "\n")

    table = Table(title=f"host-overhead proxy: DeiT-S shape, width {PROXY['embed_dim']}, batch 1, {args.rounds} rounds x "
                        f"{args.images} images, torch {torch.__version__}, 1 thread", title_justify="left")
    for column in ("method", "compiled", "GFLOPs", "aten calls", "host reads", "ms / forward", "time / unmerged",
                   "compile s", "graphs"):
        table.add_column(column, justify="left" if column in ("method", "compiled") else "right")
    for row in rows:
        table.add_row(row["method"], "yes" if row["compiled"] else "no", f"{row['gflops']:.4f}", str(row["aten_calls"]),
                      str(row["host_syncs"]), f"{row['ms_per_forward']:.2f}", f"{row['time_over_unmerged']:.2f}",
                      "" if row["compile_seconds"] is None else f"{row['compile_seconds']:.0f}",
                      "" if row["variants"] is None else str(row["variants"]))
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
