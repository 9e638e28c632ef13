"""Engine speed: does a GFLOPs cut become the same wall-clock cut, per model, batch size and precision?

    python benchmarks/engine.py [--device cuda] [--models deit_small_patch16_224,deit_base_patch16_224]
                                [--batch-sizes 1,8,64,256] [--precisions fp32,bf16,fp16] [--compile no|yes|both]
                                [--json FILE]

The images are the shared ImageNet validation sample: the archive `../shared/data/imagenet-val-sample.tar.gz`
is unpacked into a temporary folder (or pass `--data` an unpacked folder, e.g. after
`tar -xzf ../shared/data/imagenet-val-sample.tar.gz -C .cache/`: `--data .cache/imagenet-val-sample`).
Models have random weights (no pretrained weights on these machines). For each model, batch size and
precision, the unmerged model, ATM and ToMe (both tuned to about `--reduction` fewer GFLOPs on the first
batch), each a copy of the model patched once, run in alternation, batch by batch, so that machine noise
hits them alike; images/s is the median over rounds, each forward synchronised. With `--compile`, the
copies are also (both) or only (yes) measured compiled as `atm --compile on` runs them
(`atm_cli.engine.compiled`: static shapes, one graph per batch size for ToMe, CUDA graphs on the GPU;
ATM in per-block segments, its tokens padded to multiples of 8, and ATM with r rounded to multiples
of 8, "ATM g8", a different setting), compile time left out and reported. The last columns: speedup / (baseline GFLOPs / method GFLOPs),
1.0 when merging costs nothing beyond the FLOPs it saves (issue target on an H100/H200-class GPU: >= 0.9
at batch >= 64 in bf16 and fp16), and the attention kernels `scaled_dot_product_attention` chose (read off
the profiler's op names: flash, efficient, cudnn or math).
"""
from __future__ import annotations

import argparse
import bisect
import copy
import json
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import timm
import torch
from rich.console import Console
from rich.table import Table
from timm.data import create_transform, resolve_model_data_config
from torch.profiler import ProfilerActivity, profile
from torchvision.datasets import ImageFolder

from atm_cli.engine import ATMConfig, ToMeConfig, last_trace, merging, patch
from atm_cli.engine.compiled import compile_patched
from atm_cli.evaluation.models import PRECISIONS, synchronize

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "imagenet-val-sample.tar.gz"
KERNELS = {"flash": "flash", "efficient": "efficient", "cudnn": "cudnn", "math": "math"}


def unpacked(data: Path) -> Path:
    if data.is_dir():
        return data
    tmp = Path(tempfile.mkdtemp(prefix="atm-bench-"))
    with tarfile.open(data) as tar:
        tar.extractall(tmp, filter="data")
    return next(p for p in tmp.iterdir() if p.is_dir())


def image_pool(folder: Path, model: torch.nn.Module, n_images: int) -> torch.Tensor:
    """`n_images` images spread over the classes, as the model's evaluation transform makes them."""
    dataset = ImageFolder(str(folder), transform=create_transform(**resolve_model_data_config(model)))
    step = max(1, len(dataset) // n_images)
    return torch.stack([dataset[i][0] for i in range(0, len(dataset), step)][:n_images])


def gflops_of(model: torch.nn.Module, config, batch: torch.Tensor) -> float:
    with merging(model, config):
        model(batch)
        return last_trace(model).gflops


def first_fitting(configs: list, model, batch, target: float):
    """The first of `configs` (ordered from least to most merging) whose GFLOPs on `batch` reach `target`,
    by bisection (GFLOPs fall along the list); the last one when none does."""
    index = bisect.bisect_left(range(len(configs) - 1), True, key=lambda i: gflops_of(model, configs[i], batch) <= target)
    return configs[index]


def atm_for(model, batch, target: float) -> ATMConfig:
    """alpha 1 and the paper's DeiT-S beta, theta_min lowered until GFLOPs reach the target (random weights
    merge differently from trained ones, so the paper's setting does not land at the target here)."""
    ladder = [ATMConfig(alpha=1.0, beta=0.045, theta_min=round(0.995 - 0.005 * step, 3)) for step in range(200)]
    return first_fitting(ladder, model, batch, target)


def tome_for(model, batch, target: float) -> ToMeConfig:
    return first_fitting([ToMeConfig(r=r) for r in range(1, 200)], model, batch, target)


def attention_kernels(run, batch, autocast) -> str:
    """Which `scaled_dot_product_attention` kernels one forward ran, from the profiler's op names."""
    with profile(activities=[ProfilerActivity.CPU]) as prof, autocast:
        run(batch)
    names = {event.name for event in prof.events() if "scaled_dot_product" in event.name}
    found = sorted({label for name in names for key, label in KERNELS.items() if key in name})
    return ",".join(found) or ("math" if names else "unfused")


def prepared(model: torch.nn.Module, config, compiled: bool) -> tuple:
    """A view of `model` patched once with `config` (None: unmerged): (what to call, what holds the trace),
    compiled as `atm --compile on` compiles it when asked."""
    patched = copy.copy(model)
    if config is not None:
        patch(patched, config)
    return (compile_patched(patched) if compiled else patched), patched


def measure(model, device, pool, batch_size, precision, reduction, rounds, n_batches, compiled=False) -> list[dict]:
    dtype = PRECISIONS[precision]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    batches = [pool[i * batch_size:(i + 1) * batch_size].to(device) for i in range(n_batches)]
    batches = [b for b in batches if len(b) == batch_size]
    warm_up = 2 if compiled else 1  # compilation, and recompiles for code paths the first batches missed
    with torch.inference_mode(), autocast:
        base = gflops_of(model, ToMeConfig(r=0), batches[0])
        target = base * (1 - reduction)
        atm = atm_for(model, batches[0], target)
        methods = {"unmerged": None, "ATM": atm, "ToMe": tome_for(model, batches[0], target)}
        if compiled:
            methods["ATM g8"] = ATMConfig(**{**atm.to_params(), "r_multiple": 8})
        runs = {name: prepared(model, config, compiled) for name, config in methods.items()}
        seconds = {name: [] for name in methods}
        gflops = {name: [] for name in methods}
        for round_index in range(warm_up + rounds):  # warm-up rounds: kernels chosen, caches filled
            for batch in batches:
                for name, (run, traced) in runs.items():
                    synchronize(device)
                    start = time.perf_counter()
                    run(batch)
                    synchronize(device)
                    if round_index >= warm_up:
                        seconds[name].append(time.perf_counter() - start)
                        gflops[name].append(last_trace(traced).gflops if methods[name] else base)
        kernels = {name: attention_kernels(run, batches[0], autocast) for name, (run, _) in runs.items()}
    base_rate = batch_size / statistics.median(seconds["unmerged"])
    rows = []
    for name, config in methods.items():
        rate = batch_size / statistics.median(seconds[name])
        mean_gflops = statistics.fmean(gflops[name])
        speedup = rate / base_rate
        rows.append({"method": name, "setting": "" if config is None else config.to_params(),
                     "batch_size": batch_size, "precision": precision, "compiled": compiled, "gflops": mean_gflops,
                     "images_per_sec": rate, "speedup": speedup,
                     "speedup_per_gflops_ratio": speedup / (base / mean_gflops), "kernels": kernels[name],
                     "compile_seconds": getattr(runs[name][0], "compile_seconds", 0.0),
                     "graphs": getattr(runs[name][0], "variants", 0)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="deit_small_patch16_224")
    parser.add_argument("--batch-sizes", default="8,32")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--batches", type=int, default=3, help="batches per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reduction", type=float, default=0.30, help="target GFLOPs cut for ATM and ToMe")
    parser.add_argument("--compile", choices=("no", "yes", "both"), default="no",
                        help="also (both) or only (yes) with every model compiled as atm --compile on does")
    parser.add_argument("--json", type=Path, help="also write every row as JSON (after each measurement)")
    args = parser.parse_args()

    device = torch.device(args.device)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    folder = unpacked(args.data)
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval().to(device)
        pool = image_pool(folder, model, max(batch_sizes) * args.batches)
        for precision in args.precisions.split(","):
            for batch_size in batch_sizes:
                for compiled in {"no": [False], "yes": [True], "both": [False, True]}[args.compile]:
                    for row in measure(model, device, pool, batch_size, precision, args.reduction, args.rounds,
                                       args.batches, compiled):
                        rows.append({"model": name, **row})
                    if args.json:  # a run cut short keeps what it measured
                        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    table = Table(title=f"random-weight models on ImageNet sample images, {device_name}, {args.rounds} rounds x "
                        f"{args.batches} batches, torch {torch.__version__}", title_justify="left")
    for column in ("model", "batch", "precision", "compiled", "method", "GFLOPs", "images/s", "speedup", "speedup / GFLOPs ratio",
                   "attention kernel"):
        table.add_column(column, justify="left" if column in ("model", "precision", "compiled", "method", "attention kernel")
                         else "right")
    for row in rows:
        table.add_row(row["model"], str(row["batch_size"]), row["precision"], "yes" if row["compiled"] else "no",
                      row["method"], f"{row['gflops']:.3f}",
                      f"{row['images_per_sec']:.1f}", f"{row['speedup']:.3f}", f"{row['speedup_per_gflops_ratio']:.3f}",
                      row["kernels"])
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
