"""The one measurement record: what one batch gave through one setting, and totals over a run of them.

Every front end (`atm eval`, calibrate, stress, compare) measures with `BatchOutcome`s and reads
its figures from `Outcomes`; the Optuna study stores them with `to_record`/`from_record`.
"""
from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class BatchOutcome:
    """One batch through one setting (or the unmerged model)."""

    correct: np.ndarray  # bool per image: its top-1 class is its label
    predictions: np.ndarray  # int per image: its top-1 class
    correct5: int  # images whose label is among the top five
    gflops: float  # per image (every image of a batch keeps the same token count)
    tokens: tuple[int, ...] = ()  # tokens entering each block
    tokens_left: int = 0  # tokens leaving the last block (with `tokens`: what every block merged)

    @property
    def n(self) -> int:
        return len(self.correct)


@dataclass
class Outcomes:
    """Per-batch outcomes in batch order; totals weigh each batch by its size, as `atm eval` reports them."""

    batches: list[BatchOutcome] = field(default_factory=list)

    def add(self, outcome: BatchOutcome) -> None:
        self.batches.append(outcome)

    def extend(self, outcomes: Iterable[BatchOutcome]) -> None:
        self.batches.extend(outcomes)

    def first(self, n_batches: int) -> Outcomes:
        return Outcomes(self.batches[:n_batches])

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def batch_sizes(self) -> list[int]:
        return [o.n for o in self.batches]

    @property
    def n_images(self) -> int:
        return sum(o.n for o in self.batches)

    @property
    def correct(self) -> np.ndarray:
        return np.concatenate([o.correct for o in self.batches]) if self.batches else np.zeros(0, bool)

    @property
    def predictions(self) -> np.ndarray:
        return np.concatenate([o.predictions for o in self.batches]) if self.batches else np.zeros(0, np.int64)

    @property
    def n_correct(self) -> int:
        return int(sum(int(o.correct.sum()) for o in self.batches))

    @property
    def top1(self) -> float:
        """Percent."""
        return 100.0 * self.n_correct / self.n_images

    @property
    def top5(self) -> float:
        return 100.0 * sum(o.correct5 for o in self.batches) / self.n_images

    @property
    def batch_gflops(self) -> list[float]:
        return [o.gflops for o in self.batches]

    @property
    def gflops(self) -> float:
        """GFLOPs per image over all batches: the batch-size-weighted mean (batches differ under ATM)."""
        return sum(o.n * o.gflops for o in self.batches) / self.n_images

    @property
    def tokens_per_layer(self) -> list[float]:
        """Mean tokens entering each block, weighted by batch size."""
        return [sum(o.n * o.tokens[block] for o in self.batches) / self.n_images
                for block in range(len(self.batches[0].tokens))]

    @property
    def tokens_left(self) -> float:
        """Mean tokens leaving the last block, weighted by batch size."""
        return sum(o.n * o.tokens_left for o in self.batches) / self.n_images

    def to_record(self) -> dict:
        """Plain JSON values, to store with a trial or a study."""
        return {"sizes": self.batch_sizes, "correct": pack_bits(self.correct),
                "predictions": pack_ints(self.predictions), "correct5": [o.correct5 for o in self.batches],
                "gflops": self.batch_gflops, "tokens": [list(o.tokens) for o in self.batches],
                "tokens_left": [o.tokens_left for o in self.batches]}

    @classmethod
    def from_record(cls, record: dict) -> Outcomes:
        sizes = record["sizes"]
        n = sum(sizes)
        correct, predictions = unpack_bits(record["correct"], n), unpack_ints(record["predictions"])
        outcomes, start = cls(), 0
        for size, correct5, gflops, tokens, left in zip(sizes, record["correct5"], record["gflops"], record["tokens"],
                                                         record["tokens_left"]):
            outcomes.add(BatchOutcome(correct[start:start + size], predictions[start:start + size], correct5, gflops,
                                      tuple(tokens), left))
            start += size
        return outcomes


def agreement(merged: Outcomes, unmerged: Outcomes) -> float:
    """Percent of images whose top-1 class is the same in both runs (over the images both ran)."""
    n = min(merged.n_images, unmerged.n_images)
    return 100.0 * float((merged.predictions[:n] == unmerged.predictions[:n]).sum()) / n


@dataclass(frozen=True)
class Comparison:
    """A setting's run beside the unmerged model's on the same images: the figures every report gives
    (accuracies in percent, None without labels; GFLOPs per image)."""

    merged: Outcomes
    baseline: Outcomes
    labelled: bool = True

    @property
    def n_images(self) -> int:
        return self.merged.n_images

    @property
    def top1(self) -> float | None:
        return self.merged.top1 if self.labelled else None

    @property
    def top5(self) -> float | None:
        return self.merged.top5 if self.labelled else None

    @property
    def baseline_top1(self) -> float | None:
        return self.baseline.top1 if self.labelled else None

    @property
    def baseline_top5(self) -> float | None:
        return self.baseline.top5 if self.labelled else None

    @property
    def gflops(self) -> float:
        return self.merged.gflops

    @property
    def baseline_gflops(self) -> float:
        return self.baseline.gflops

    @property
    def gflops_reduction(self) -> float:
        """Percent fewer GFLOPs than the unmerged model."""
        return 100.0 * (1.0 - self.gflops / self.baseline_gflops)

    @property
    def agreement(self) -> float:
        return agreement(self.merged, self.baseline)


def pack_bits(values: np.ndarray) -> str:
    return base64.b64encode(np.packbits(values.astype(bool)).tobytes()).decode("ascii")


def unpack_bits(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:n].astype(bool)


def pack_ints(values: np.ndarray) -> str:
    return base64.b64encode(values.astype("<i4").tobytes()).decode("ascii")


def unpack_ints(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<i4").astype(np.int64)
