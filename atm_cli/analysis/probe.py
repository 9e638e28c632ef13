"""Layer-wise information loss (paper Sec. 3.2, Fig. 2): merge in one block only, see how far the output moves.

For each block l and each constant threshold t, the model merges (alternate matching, as in the
paper's analysis) in block l alone; the loss is the cosine distance between the merged and the
unmerged model's final class token (the pre-logits features the head reads: the final norm's
prefix token, or the size-weighted pooled tokens for average-pooled models), averaged over images.
A loss that grows towards the first blocks is why ATM's thresholds start high and fall with depth
(alpha and beta of Eq. (1)).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine import ATMConfig, last_trace, patch, unpatch
from ..errors import UsageError
from ..paper import PROBE_THRESHOLDS
from .plotting import pyplot, save_figure

NO_MERGE = 2.0  # above any cosine similarity: the block keeps every token


@dataclass
class ProbeRow:
    block: int  # 1-based, as in the paper
    distance: dict[float, float]  # threshold -> mean cosine distance of the final class token
    merged: dict[float, float]  # threshold -> tokens merged away in this block, mean per image

    @property
    def mean_distance(self) -> float:
        """The paper's bar: the mean over the thresholds."""
        return sum(self.distance.values()) / len(self.distance)


@dataclass
class ProbeReport:
    thresholds: tuple[float, ...]
    rows: list[ProbeRow]
    n_images: int

    def to_dict(self) -> dict:
        return {
            "thresholds": list(self.thresholds),
            "n_images": self.n_images,
            "rows": [
                {
                    "block": row.block,
                    "distance": {f"{t:g}": row.distance[t] for t in self.thresholds},
                    "merged": {f"{t:g}": row.merged[t] for t in self.thresholds},
                    "mean_distance": row.mean_distance,
                }
                for row in self.rows
            ],
        }


def merge_only_in(block: int, threshold: float, depth: int) -> ATMConfig:
    """Merge at `threshold` in `block` (1-based) and nowhere else, with alternate matching."""
    thresholds = [NO_MERGE] * depth
    thresholds[block - 1] = threshold
    return ATMConfig(alpha=threshold, beta=0.0, theta_min=threshold, split_layer=depth,
                     block_thresholds=tuple(thresholds), prefix_only_last_block=False)


def pre_logits(model: nn.Module, images: Tensor) -> Tensor:
    """What the classifier reads: timm's forward_head with pre_logits=True."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


@torch.inference_mode()
def probe(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], thresholds: Sequence[float] = PROBE_THRESHOLDS,
          progress: Callable[[int, int], None] | None = None) -> ProbeReport:
    """One row per block: the information loss of merging in that block only, at each threshold."""
    if not batches:
        raise UsageError("the probe needs at least one image")
    model.eval()
    device = next(model.parameters()).device
    depth = len(model.blocks)
    thresholds = tuple(thresholds)
    unpatch(model)
    inputs = [images.to(device) for images, _ in batches]
    reference = [pre_logits(model, images) for images in inputs]
    n_images = sum(images.shape[0] for images in inputs)
    total, done = depth * len(thresholds), 0
    rows = []
    try:
        for block in range(1, depth + 1):
            distance, merged = {}, {}
            for threshold in thresholds:
                patch(model, merge_only_in(block, threshold, depth))
                distance_sum = merged_sum = 0.0
                for images, expected in zip(inputs, reference):
                    features = pre_logits(model, images)
                    distance_sum += (1.0 - F.cosine_similarity(features, expected, dim=-1)).sum().item()
                    merged_sum += last_trace(model).merged[block - 1] * images.shape[0]
                distance[threshold] = distance_sum / n_images
                merged[threshold] = merged_sum / n_images
                done += 1
                if progress:
                    progress(done, total)
            rows.append(ProbeRow(block, distance, merged))
    finally:
        unpatch(model)
    return ProbeReport(thresholds, rows, n_images)


def plot_probe(report: ProbeReport, path: str | Path, title: str = "") -> Path:
    """Fig. 2: one line per threshold over the blocks, bars for their mean."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4))
    blocks = [row.block for row in report.rows]
    axes.bar(blocks, [row.mean_distance for row in report.rows], color="#cccccc", label="mean over thresholds")
    for threshold in report.thresholds:
        axes.plot(blocks, [row.distance[threshold] for row in report.rows], marker="o", label=f"threshold {threshold:g}")
    axes.set_xlabel("block merged in (all others keep every token)")
    axes.set_ylabel("cosine distance of the final class token")
    axes.set_xticks(blocks)
    axes.set_title(title or f"Information loss of merging in one block ({report.n_images} images)")
    axes.legend()
    return save_figure(figure, path)
