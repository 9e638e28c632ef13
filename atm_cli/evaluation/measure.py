"""Run batches through a merging (or unmerged) model and measure accuracy, GFLOPs, tokens and speed."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import torch
from timm.utils import accuracy
from torch import Tensor

from atm_cli.engine import MethodConfig, last_trace, merging, patch, unpatch
from atm_cli.errors import Interruptible, UsageError

from .data import ImageSet, iterate_batches, make_loader
from .models import LoadedModel, autocast

Progress = Callable[[int, int], None]


class Forward(NamedTuple):
    """One batch through the model."""

    logits: Tensor
    gflops: float  # per image
    tokens: tuple[int, ...]  # entering each block
    seconds: float  # model time, synchronised
    tokens_left: int  # leaving the last block


@dataclass
class BatchRun:
    """Per-batch results of one method on a sequence of batches; totals as properties."""

    batch_sizes: list[int] = field(default_factory=list)
    correct1: list[int] = field(default_factory=list)
    correct5: list[int] = field(default_factory=list)
    batch_gflops: list[float] = field(default_factory=list)  # GFLOPs per image of each batch
    batch_tokens: list[tuple[int, ...]] = field(default_factory=list)  # tokens entering each block
    batch_tokens_left: list[int] = field(default_factory=list)  # tokens leaving the last block
    batch_predictions: list[Tensor] = field(default_factory=list)  # top-1 class of each image (CPU)

    @property
    def n_images(self) -> int:
        return sum(self.batch_sizes)

    @property
    def top1(self) -> float:
        """Percent, as timm reports it."""
        return 100.0 * sum(self.correct1) / self.n_images

    @property
    def top5(self) -> float:
        return 100.0 * sum(self.correct5) / self.n_images

    @property
    def gflops(self) -> float:
        """GFLOPs per image over all batches: the batch-size-weighted mean (batches differ under ATM)."""
        return sum(n * g for n, g in zip(self.batch_sizes, self.batch_gflops)) / self.n_images

    @property
    def tokens_per_layer(self) -> list[float]:
        """Mean tokens entering each block, weighted by batch size."""
        return [sum(n * tokens[block] for n, tokens in zip(self.batch_sizes, self.batch_tokens)) / self.n_images
                for block in range(len(self.batch_tokens[0]))]

    @property
    def tokens_left(self) -> float:
        """Mean tokens leaving the last block (with `tokens_per_layer`: what each block merged)."""
        return sum(n * left for n, left in zip(self.batch_sizes, self.batch_tokens_left)) / self.n_images

    @property
    def predictions(self) -> Tensor:
        return torch.cat(self.batch_predictions)

    def keep_first(self, n_batches: int) -> None:
        for f in fields(self):
            del getattr(self, f.name)[n_batches:]

    def add(self, forward: Forward, labels: Tensor) -> None:
        logits = forward.logits
        top1, top5 = accuracy(logits.float(), labels.to(logits.device), topk=(1, 5))
        n = len(labels)
        # timm returns percentages of the batch; counts keep totals exact across batches of any size.
        self.batch_sizes.append(n)
        self.correct1.append(round(top1.item() * n / 100))
        self.correct5.append(round(top5.item() * n / 100))
        self.batch_gflops.append(forward.gflops)
        self.batch_tokens.append(forward.tokens)
        self.batch_tokens_left.append(forward.tokens_left)
        self.batch_predictions.append(logits.argmax(dim=1).cpu())


def describe_method(method: MethodConfig | None) -> tuple[str, dict]:
    """The method's registry name and its parameters as plain values ("none" for the unmerged model)."""
    return ("none", {}) if method is None else (method.NAME, method.to_params())


def check_method(loaded: LoadedModel, method: MethodConfig | None) -> None:
    """Fail before any image is loaded when the engine rejects the config for this model."""
    if method is None:
        return
    try:
        patch(loaded.model, method)
    except ValueError as error:
        raise UsageError(f"{type(method).__name__} on {loaded.name}: {error}") from None
    finally:
        unpatch(loaded.model)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward(loaded: LoadedModel, images: Tensor, merged: bool) -> Forward:
    """One batch through `loaded.model` as it is now (patched when `merged`), at the model's precision."""
    _synchronize(loaded.device)
    started = time.perf_counter()
    with torch.inference_mode(), autocast(loaded):
        logits = loaded.model(images.to(loaded.device, non_blocking=True))
    _synchronize(loaded.device)
    seconds = time.perf_counter() - started
    if not merged:
        return Forward(logits, loaded.unmerged_gflops, loaded.unmerged_tokens, seconds, loaded.unmerged_tokens[-1])
    trace = last_trace(loaded.model)
    return Forward(logits, trace.gflops, tuple(trace.tokens[:-1]), seconds, trace.tokens[-1])


def run_batches(loaded: LoadedModel, batches: Iterable[tuple[Tensor, Tensor]], method: MethodConfig | None = None,
                max_batches: int | None = None, progress: Progress | None = None) -> BatchRun:
    """Run `method` (None: the unmerged model) on the batches, the first `max_batches` of them if given."""
    check_method(loaded, method)
    batches = list(batches) if max_batches is None else list(batches)[:max_batches]
    run = BatchRun()
    with merging(loaded.model, method):
        for done, (images, labels) in enumerate(batches, start=1):
            run.add(_forward(loaded, images, method is not None), labels)
            if progress is not None:
                progress(done, len(batches))
    return run


@dataclass
class EvalReport:
    """What `atm eval` reports: the method and the unmerged model, measured on the same batches."""

    model: str
    model_tag: str | None
    checkpoint_sha256: str | None
    method: str
    params: dict
    batch_size: int
    device: str
    precision: str
    workers: int
    data: str
    data_fingerprint: str
    skipped_images: int
    merged: BatchRun
    baseline: BatchRun
    model_seconds: float  # the method's forward passes, synchronised, after warm-up
    baseline_model_seconds: float
    end_to_end_seconds: float  # the pass's wall time without the unmerged model's forward passes
    n_files: int  # images in the folder (readable or not)
    interrupted: bool = False  # the pass stopped early: the figures cover the images measured so far

    @property
    def agreement(self) -> float:
        """Percent of images where the method's top-1 class equals the unmerged model's."""
        same = (self.merged.predictions == self.baseline.predictions).sum().item()
        return 100.0 * same / self.merged.n_images

    def to_dict(self) -> dict:
        n = self.merged.n_images
        return {
            "model": self.model,
            "model_tag": self.model_tag,
            "checkpoint_sha256": self.checkpoint_sha256,
            "method": self.method,
            "params": self.params,
            "n_images": n,
            "skipped_images": self.skipped_images,
            "batch_size": self.batch_size,
            "device": self.device,
            "precision": self.precision,
            "workers": self.workers,
            "data": self.data,
            "data_fingerprint": self.data_fingerprint,
            "top1": self.merged.top1,
            "top5": self.merged.top5,
            "gflops": self.merged.gflops,
            "baseline_top1": self.baseline.top1,
            "baseline_top5": self.baseline.top5,
            "baseline_gflops": self.baseline.gflops,
            "gflops_reduction": 100.0 * (1.0 - self.merged.gflops / self.baseline.gflops),
            "agreement": self.agreement,
            "images_per_sec": n / self.model_seconds,
            "baseline_images_per_sec": n / self.baseline_model_seconds,
            "end_to_end_images_per_sec": n / self.end_to_end_seconds,
            "tokens_per_layer": self.merged.tokens_per_layer,
            "baseline_tokens_per_layer": self.baseline.tokens_per_layer,
            "interrupted": self.interrupted,
            "n_files": self.n_files,
        }


def evaluate(loaded: LoadedModel, images: ImageSet, method: MethodConfig | None, batch_size: int, workers: int,
             progress: Progress | None = None, keep_partial: bool = False) -> EvalReport:
    """One pass over `images`: each batch runs through the unmerged model and through `method`.

    Speeds are measured after one untimed warm-up forward of each model on the first batch.
    End-to-end time is the pass's wall time less the unmerged model's forward passes: loading,
    transfer and the method's model (the extra forward gives the loader slack, so the benchmark
    benchmarks/eval_loader.py measures the pipeline alone).

    With `keep_partial`, an interrupt (Ctrl-C) after the first batch ends the pass early and the
    report covers the batches finished (`interrupted` is then True); without it, it propagates.
    """
    check_method(loaded, method)
    loader = make_loader(images, batch_size, workers, loaded.device)
    merged, baseline = BatchRun(), BatchRun()
    model_seconds = baseline_seconds = excluded_seconds = 0.0
    total = len(images.dataset)
    started = time.perf_counter()
    with Interruptible(keep_partial) as stop:
        for images_batch, labels in iterate_batches(images, loader):
            images_batch = images_batch.to(loaded.device, non_blocking=True)
            if not baseline.batch_sizes:
                warm_up_started = time.perf_counter()
                _forward(loaded, images_batch, merged=False)
                with merging(loaded.model, method):
                    _forward(loaded, images_batch, merged=method is not None)
                excluded_seconds += time.perf_counter() - warm_up_started
            unmerged = _forward(loaded, images_batch, merged=False)
            baseline_seconds += unmerged.seconds
            if method is None:
                merged_forward = unmerged
            else:
                excluded_seconds += unmerged.seconds
                with merging(loaded.model, method):
                    merged_forward = _forward(loaded, images_batch, merged=True)
            model_seconds += merged_forward.seconds
            # Both runs take the batch together, so an interrupted pass compares the same images.
            baseline.add(unmerged, labels)
            merged.add(merged_forward, labels)
            if progress is not None:
                progress(merged.n_images + images.skipped, total)
    if stop.interrupted:
        if not merged.batch_sizes:
            raise KeyboardInterrupt  # nothing measured to report
        baseline.keep_first(len(merged.batch_sizes))  # the interrupt may fall between the two adds
    if not merged.batch_sizes:
        raise UsageError(f"no readable image in {images.root} ({images.skipped} unreadable)")
    name, params = describe_method(method)
    return EvalReport(
        model=loaded.name,
        model_tag=loaded.tag,
        checkpoint_sha256=loaded.checkpoint_sha256,
        method=name,
        params=params,
        batch_size=batch_size,
        device=str(loaded.device),
        precision=loaded.precision,
        workers=workers,
        data=images.source,
        data_fingerprint=images.fingerprint,
        skipped_images=images.skipped,
        merged=merged,
        baseline=baseline,
        model_seconds=model_seconds,
        baseline_model_seconds=baseline_seconds,
        end_to_end_seconds=time.perf_counter() - started - excluded_seconds,
        n_files=images.n_files,
        interrupted=stop.interrupted,
    )
