"""Engine speed: does a GFLOPs cut become the same wall-clock cut?

    python benchmarks/engine.py [--data ../shared/data/imagenet-val-sample.tar.gz or an unpacked folder]

Randomly initialised DeiT-S (no pretrained weights on these machines) on real ImageNet validation
images, batch 32, on CUDA when present and on the CPU otherwise. Methods run in alternation, batch by
batch, so that machine noise hits all of them alike; images/s is the median over rounds. The table's
last column, speedup / (baseline GFLOPs / method GFLOPs), is 1.0 when merging costs nothing beyond the
FLOPs it saves; the target is >= 0.95 at about 30% fewer GFLOPs.
"""
from __future__ import annotations

import argparse
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
from torchvision.datasets import ImageFolder

from atm_cli.engine import ATMConfig, ToMeConfig, last_trace, patch, unpatch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "imagenet-val-sample.tar.gz"


def image_batches(data: Path, model: torch.nn.Module, batch_size: int, n_batches: int) -> list[torch.Tensor]:
    if data.is_file():  # an archive: unpack it into a temporary folder first
        tmp = Path(tempfile.mkdtemp(prefix="atm-bench-"))
        with tarfile.open(data) as tar:
            tar.extractall(tmp, filter="data")
        data = next(p for p in tmp.iterdir() if p.is_dir())
    transform = create_transform(**resolve_model_data_config(model))
    dataset = ImageFolder(str(data), transform=transform)
    step = max(1, len(dataset) // (batch_size * n_batches))  # spread over classes
    picks = [dataset[i][0] for i in range(0, len(dataset), step)][: batch_size * n_batches]
    return list(torch.stack(picks).split(batch_size))


def calibrate_atm_to(model: torch.nn.Module, batch: torch.Tensor, target_gflops: float) -> ATMConfig:
    """alpha 1 and the paper's DeiT-S beta, with theta_min lowered until GFLOPs reach the target (random
    weights merge differently from trained ones, so the paper's setting does not land at -30% here)."""
    for step in range(60):
        config = ATMConfig(alpha=1.0, beta=0.045, theta_min=round(0.995 - 0.005 * step, 3))
        patch(model, config)
        model(batch)
        if last_trace(model).gflops <= target_gflops:
            return config
    return config


def tome_r_for(model: torch.nn.Module, batch: torch.Tensor, target_gflops: float) -> int:
    for r in range(1, 40):
        patch(model, ToMeConfig(r=r))
        model(batch)
        if last_trace(model).gflops <= target_gflops:
            return r
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reduction", type=float, default=0.30, help="target GFLOPs cut for ATM and ToMe")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval().to(device)
    batches = [b.to(device) for b in image_batches(args.data, model, args.batch_size, args.batches)]

    with torch.inference_mode():
        patch(model, ToMeConfig(r=0))
        model(batches[0])
        base_gflops = last_trace(model).gflops
        target = base_gflops * (1 - args.reduction)
        methods = {
            "unmerged": None,
            "ToMe": ToMeConfig(r=tome_r_for(model, batches[0], target)),
            "ATM": calibrate_atm_to(model, batches[0], target),
        }
        unpatch(model)
        seconds = {name: [] for name in methods}
        gflops = {name: [] for name in methods}
        for round_index in range(args.rounds + 1):  # round 0 warms up
            for batch in batches:
                for name, config in methods.items():
                    patch(model, config) if config else unpatch(model)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    model(batch)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if round_index:
                        seconds[name].append(time.perf_counter() - start)
                        gflops[name].append(last_trace(model).gflops if config else base_gflops)

    table = Table(title=f"{args.model} (random weights), batch {args.batch_size}, {device.type}, "
                        f"{args.rounds} rounds x {len(batches)} batches, torch {torch.__version__}")
    for column in ("method", "settings", "GFLOPs", "images/s", "speedup", "speedup / GFLOPs ratio"):
        table.add_column(column, justify="right" if column not in ("method", "settings") else "left")
    base_rate = args.batch_size / statistics.median(seconds["unmerged"])
    for name, config in methods.items():
        rate = args.batch_size / statistics.median(seconds[name])
        mean_gflops = statistics.fmean(gflops[name])
        speedup = rate / base_rate
        settings = "" if config is None else (f"r={config.r}" if isinstance(config, ToMeConfig) else
                                              f"a={config.alpha} b={config.beta} t={config.theta_min}")
        table.add_row(name, settings, f"{mean_gflops:.3f}", f"{rate:.1f}", f"{speedup:.3f}",
                      f"{speedup / (base_gflops / mean_gflops):.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()
