"""Run batches through a merging (or unmerged) model and measure accuracy, GFLOPs, tokens and speed."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from atm_cli.engine import MethodConfig, last_trace
from atm_cli.errors import Interruptible, UsageError

from .data import ImageSet, iterate_batches, make_loader
from .models import LoadedModel, autocast, synchronize
from .outcomes import BatchOutcome, Comparison, Outcomes
from .workload import Workload, patched_view

Progress = Callable[[int, int], None]


def describe_method(method: MethodConfig | None) -> tuple[str, dict]:
    """The method's registry name and its parameters as plain values ("none" for the unmerged model)."""
    return ("none", {}) if method is None else (method.NAME, method.to_params())


def check_method(loaded: LoadedModel, method: MethodConfig | None) -> None:
    """Fail before any image is loaded when the engine rejects the config for this model."""
    if method is not None:
        patched_view(loaded, method)


def measure_batch(loaded: LoadedModel, model: Callable[[Tensor], Tensor], traced: nn.Module | None, images: Tensor,
                  labels: Tensor) -> tuple[BatchOutcome, float]:
    """One batch through `model` (`loaded.model`, a view of it patched for a setting, or either compiled) at
    the model's precision: its outcome and the model's time in seconds (synchronised). `traced`: the patched
    view whose trace gives GFLOPs and tokens (None: the unmerged model)."""
    synchronize(loaded.device)
    started = time.perf_counter()
    with torch.inference_mode(), autocast(loaded):
        logits = model(images.to(loaded.device, non_blocking=True))
    synchronize(loaded.device)
    seconds = time.perf_counter() - started
    if traced is not None:
        trace = last_trace(traced)
        gflops, tokens, tokens_left = trace.gflops, tuple(trace.tokens[:-1]), trace.tokens[-1]
    else:
        gflops, tokens, tokens_left = loaded.unmerged_gflops, loaded.unmerged_tokens, loaded.unmerged_tokens[-1]
    labels = labels.to(logits.device)
    top5 = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
    predictions = top5[:, 0]
    outcome = BatchOutcome(correct=(predictions == labels).cpu().numpy(), predictions=predictions.cpu().numpy(),
                           correct5=int((top5 == labels[:, None]).any(dim=1).sum().item()), gflops=gflops,
                           tokens=tuple(tokens), tokens_left=tokens_left)
    return outcome, seconds


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
    merged: Outcomes
    baseline: Outcomes
    model_seconds: float  # the method's forward passes, synchronised, after warm-up
    baseline_model_seconds: float
    end_to_end_seconds: float  # the pass's wall time without the unmerged model's forward passes
    n_files: int  # images in the folder (readable or not)
    interrupted: bool = False  # the pass stopped early: the figures cover the images measured so far
    compiled: bool = False  # both models ran through torch.compile
    compile_seconds: float = 0.0  # compiling both, left out of every speed

    @property
    def comparison(self) -> Comparison:
        return Comparison(self.merged, self.baseline)

    def to_dict(self) -> dict:
        n, figures = self.merged.n_images, self.comparison
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
            "top1": figures.top1,
            "top5": figures.top5,
            "gflops": figures.gflops,
            "baseline_top1": figures.baseline_top1,
            "baseline_top5": figures.baseline_top5,
            "baseline_gflops": figures.baseline_gflops,
            "gflops_reduction": figures.gflops_reduction,
            "agreement": figures.agreement,
            "speedup": self.baseline_model_seconds / self.model_seconds,
            "images_per_sec": n / self.model_seconds,
            "baseline_images_per_sec": n / self.baseline_model_seconds,
            "end_to_end_images_per_sec": n / self.end_to_end_seconds,
            "tokens_per_layer": self.merged.tokens_per_layer,
            "baseline_tokens_per_layer": self.baseline.tokens_per_layer,
            "interrupted": self.interrupted,
            "n_files": self.n_files,
            "compiled": self.compiled,
            "compile_seconds": self.compile_seconds,
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
    workload = Workload(loaded)
    workload.model(method)  # the setting is checked (and patched, once) before any image is loaded
    loader = make_loader(images, batch_size, workers, loaded.device)
    merged, baseline = Outcomes(), Outcomes()
    model_seconds = baseline_seconds = excluded_seconds = compile_seconds_in_warm_up = 0.0
    total = len(images.dataset)
    started = time.perf_counter()
    with Interruptible(keep_partial) as stop:
        for images_batch, labels in iterate_batches(images, loader):
            images_batch = images_batch.to(loaded.device, non_blocking=True)
            if not len(baseline):
                warm_up_started = time.perf_counter()
                workload.measure(None, images_batch, labels)
                workload.measure(method, images_batch, labels)
                excluded_seconds += time.perf_counter() - warm_up_started
                compile_seconds_in_warm_up = workload.compile_seconds
            unmerged, seconds = workload.measure(None, images_batch, labels)
            baseline_seconds += seconds
            if method is None:
                merged_outcome = unmerged
            else:
                excluded_seconds += seconds
                merged_outcome, seconds = workload.measure(method, images_batch, labels)
            model_seconds += seconds
            # Both runs take the batch together, so an interrupted pass compares the same images.
            baseline.add(unmerged)
            merged.add(merged_outcome)
            if progress is not None:
                progress(merged.n_images + images.skipped, total)
    if stop.interrupted:
        if not len(merged):
            raise KeyboardInterrupt  # nothing measured to report
        baseline = baseline.first(len(merged))  # the interrupt may fall between the two adds
    if not len(merged):
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
        end_to_end_seconds=time.perf_counter() - started - excluded_seconds
        - (workload.compile_seconds - compile_seconds_in_warm_up),
        n_files=images.n_files,
        interrupted=stop.interrupted,
        compiled=loaded.compiled,
        compile_seconds=workload.compile_seconds,
    )
