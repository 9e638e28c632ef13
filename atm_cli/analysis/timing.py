"""What stress and compare rank and budget the methods by (`By`: GFLOPs, or time on this device), and each answer
timed for real beside the unmerged model (`timed`: the first batch, a few interleaved rounds, the median ratio;
`Timing` says how)."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ..engine import MethodConfig
from ..errors import UsageError, param
from ..evaluation import Workload
from ..evaluation.latency import MeasuredSpeed, device_name, measure_speedups

SPEED_REPEATS = 5  # interleaved rounds on one batch: a column beside GFLOPs, not a benchmark


class By(str, Enum):
    """What methods are ranked (stress) and budgeted (compare) by: GFLOPs per image, or time on this device."""

    GFLOPS = "gflops"
    TIME = "time"

    @classmethod
    def parse(cls, text: str) -> By:
        try:
            return cls(text)
        except ValueError:
            raise UsageError(f"{param('by')} {text}: choose from {', '.join(by.value for by in cls)}") from None


@dataclass(frozen=True)
class Timing:
    """How the speedups were measured: each answer beside the unmerged model on the first batch, interleaved."""

    device: str
    batch_size: int
    repeats: int
    compiled: bool
    compile_seconds: float  # compiling while the settings ran on the images: left out of every figure

    @classmethod
    def of(cls, workload: Workload) -> Timing:
        loaded = workload.loaded
        return cls(device_name(loaded.device), len(workload.batches[0][1]), SPEED_REPEATS, loaded.compiled,
                   workload.compile_seconds)

    def to_dict(self) -> dict:
        return {"device": self.device, "batch_size": self.batch_size, "repeats": self.repeats,
                "compiled": self.compiled, "compile_seconds": self.compile_seconds}


def timed(workload: Workload, config: MethodConfig) -> MeasuredSpeed:
    """`config` timed for real beside the unmerged model on the first batch (interleaved rounds, medians)."""
    speed, = measure_speedups(workload.loaded, workload.batches[0][0], [config], SPEED_REPEATS)
    return speed
