"""A latency model measured on the device: a setting's time per batch predicted from its token counts.

One transformer block is timed on the target device, batch size and precision as a function of the
tokens entering it, in two halves (attention, then the MLP: a method's step between them leaves the
MLP fewer tokens), at every STEP_TOKENS tokens from the fewest a setting keeps to the full count;
the stem and the head are timed once. Between table points the time is interpolated linearly. The
blocks of a timm ViT are alike, so one block's table serves every block.

A method's own work per block (its step, and the patched forward's bookkeeping around it) is not
timed in isolation: it depends on the data (ATM decides how many tokens to merge from the images'
similarities, with one host synchronisation per block) and on how the steps' results flow into the
next block, which a block fed random tokens would not show. It is fitted instead from whole-model
runs of a few of the method's settings on real images: per block, a constant plus a cost per token
entering the block (least squares on what the block table leaves unexplained).

Timings use warm-up, device synchronisation and the median of repeats, and every repeat runs each
thing timed once in turn (interleaved), so that a load that drifts during the measurement (a shared
machine) weighs on every point alike. Fits are expressed at the load the table was measured under
(each fit's runs are scaled by how the unmerged model ran beside them), so that speedups stay right
when absolute times do not.

The model is cached as JSON per (device name, torch version, model, batch size, precision, compiled)
under the cache folder (`$ATM_CACHE`, else ~/.cache/atm).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from atm_cli.engine import MethodConfig
from atm_cli.engine.compiled import compile_patched
from atm_cli.files import write_atomically

from .models import LoadedModel, autocast, require_timm, synchronize
from .outcomes import Outcomes
from .workload import patched_view

Progress = Callable[[int, int], None]
STEP_TOKENS = 8  # table spacing
FORMAT = 1  # of the cache file
CACHE_ENV = "ATM_CACHE"
TABLE_REPEATS = 7
FIT_REPEATS = 5


def cache_dir(folder: str | Path | None = None) -> Path:
    """Where cached latency models live: `folder`, else $ATM_CACHE, else ~/.cache/atm."""
    if folder is not None:
        return Path(folder)
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "atm")


def device_name(device: torch.device) -> str:
    """The device as its timings depend on it: the GPU's name, or the CPU's model and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        model = found.group(1).strip() if found else model
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


@dataclass(frozen=True)
class LatencyKey:
    """What a latency model's timings hold for."""

    device: str
    torch_version: str
    model: str
    batch_size: int
    precision: str
    compiled: bool

    @classmethod
    def of(cls, loaded: LoadedModel, batch_size: int) -> LatencyKey:
        return cls(device_name(loaded.device), torch.__version__, loaded.name, batch_size, loaded.precision,
                   loaded.compiled)

    def file_name(self) -> str:
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{self.model}-b{self.batch_size}-{self.precision}")
        return f"latency-{slug}-{digest}.json"


@dataclass(frozen=True)
class TokenTable:
    """Seconds at a few token counts (ascending), linear in between and flat beyond the ends."""

    tokens: tuple[int, ...]
    seconds: tuple[float, ...]

    def at(self, n_tokens: float) -> float:
        return float(np.interp(n_tokens, self.tokens, self.seconds))


@dataclass(frozen=True)
class StepCost:
    """A method's own seconds per block: `per_block` plus `per_token` for each token entering the block."""

    per_block: float
    per_token: float
    settings: int = 0  # whole-model runs it was fitted on

    def at(self, n_tokens: float) -> float:
        return self.per_block + self.per_token * n_tokens


@dataclass
class LatencyModel:
    key: LatencyKey
    stem: float  # seconds per batch: patch embedding, position embedding
    head: float  # final norm, pooling, head
    attention: TokenTable  # one block's first half: norm1, attention, residual
    mlp: TokenTable  # its second half: norm2, MLP, residual
    # The whole unmerged model measured over the sum of its parts, at the same time: what running the
    # parts inside one forward adds (Python, caches); it scales every prediction from the tables.
    scale: float = 1.0
    steps: dict[str, StepCost] = field(default_factory=dict)  # method name -> its fitted step cost

    def tables_seconds(self, tokens: Sequence[float]) -> float:
        """Stem, blocks and head from the tables, without any method's step; `tokens` as `Trace.tokens`:
        entering each block, then leaving the last (a block's MLP runs on the next block's count)."""
        blocks = sum(self.attention.at(n_in) + self.mlp.at(n_out) for n_in, n_out in zip(tokens, tokens[1:]))
        return self.scale * (self.stem + blocks + self.head)

    def predict_seconds(self, tokens: Sequence[float], method: str | None = None) -> float:
        """Seconds per batch of a setting whose trace gave `tokens` (L + 1 values); `method`: its registry
        name (fitted with `fit_step`), None for the unmerged model."""
        seconds = self.tables_seconds(tokens)
        if method is None:
            return seconds
        if method not in self.steps:
            raise KeyError(f"no step cost fitted for {method!r} (fit_step first)")
        return seconds + sum(self.steps[method].at(n) for n in tokens[:-1])

    def outcomes_seconds(self, outcomes: Outcomes, method: str | None = None) -> float:
        """Seconds per batch over a run's batches, each predicted from its own token counts (ATM's differ
        from batch to batch) as a batch of the model's size, weighted by its images."""
        weighted = sum(o.n * self.predict_seconds((*o.tokens, o.tokens_left), method) for o in outcomes.batches)
        return weighted / outcomes.n_images

    def unmerged_seconds(self, depth: int) -> float:
        full = self.attention.tokens[-1]
        return self.predict_seconds([full] * (depth + 1))

    def to_dict(self) -> dict:
        return {"format": FORMAT, "key": dataclasses.asdict(self.key), "stem": self.stem, "head": self.head,
                "attention": dataclasses.asdict(self.attention), "mlp": dataclasses.asdict(self.mlp),
                "scale": self.scale, "steps": {name: dataclasses.asdict(cost) for name, cost in self.steps.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> LatencyModel:
        def table(values: dict) -> TokenTable:
            return TokenTable(tuple(values["tokens"]), tuple(values["seconds"]))

        return cls(key=LatencyKey(**data["key"]), stem=data["stem"], head=data["head"],
                   attention=table(data["attention"]), mlp=table(data["mlp"]), scale=data["scale"],
                   steps={name: StepCost(**cost) for name, cost in data["steps"].items()})


def read_cached(key: LatencyKey, folder: Path) -> LatencyModel | None:
    """The cached model for `key` (None: none, or a file of another format, key or a damaged one)."""
    path = folder / key.file_name()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            return None
        model = LatencyModel.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return model if model.key == key else None


def write_cached(model: LatencyModel, folder: Path) -> Path | None:
    """Save atomically; None when the folder cannot be written: the cache only saves time, so the measured
    model is used all the same."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return write_atomically(folder / model.key.file_name(), json.dumps(model.to_dict(), indent=1))
    except OSError:
        return None


def token_grid(fewest: int, full: int, step: int = STEP_TOKENS) -> tuple[int, ...]:
    """Every `step` tokens down from `full`, and `fewest`, ascending."""
    return tuple(sorted({*range(full, fewest, -step), fewest}))


def interleaved_seconds(runs: Sequence[Callable[[], object]], loaded: LoadedModel, repeats: int,
                        progress: Progress | None = None) -> list[list[float]]:
    """Each run's seconds in every repeat (rows: runs), after untimed warm-up calls of each; every repeat
    runs each one once in turn, at the model's precision, synchronised. The order rotates from round to
    round, so that no run always follows the same one (or always goes first)."""
    # Compiled: the first call compiles, and CUDA graphs are recorded on the calls after it.
    warm_up = 3 if loaded.compiled else 1
    times: list[list[float]] = [[] for _ in runs]
    total, done = (warm_up + repeats) * len(runs), 0
    with torch.inference_mode(), autocast(loaded):
        for round_ in range(warm_up + repeats):
            for step in range(len(runs)):
                index = (round_ + step) % len(runs)
                synchronize(loaded.device)
                started = time.perf_counter()
                runs[index]()
                synchronize(loaded.device)
                if round_ >= warm_up:
                    times[index].append(time.perf_counter() - started)
                done += 1
                if progress is not None:
                    progress(done, total)
    return times


def _compiled(function: Callable[[Tensor], Tensor], loaded: LoadedModel) -> Callable[[Tensor], Tensor]:
    """`function` (a model, or a piece of one) as the model's forward runs it: compiled when the model runs
    compiled (static shapes: one graph per table point)."""
    return compile_patched(function) if loaded.compiled else function


def _model_run(loaded: LoadedModel, model: nn.Module, images: Tensor) -> Callable[[], object]:
    run = _compiled(model, loaded)
    return lambda: run(images)


def _beside_unmerged(loaded: LoadedModel, images: Tensor, configs: Sequence[MethodConfig], repeats: int,
                     progress: Progress | None) -> tuple[list[float], list[list[float]], list[nn.Module]]:
    """Each setting (a view patched for it) and the unmerged model run on `images`, interleaved: the unmerged
    model's seconds per round, each setting's, and the views (their traces hold the timed token counts)."""
    views = [patched_view(loaded, config) for config in configs]
    images = images.to(loaded.device)
    runs = [_model_run(loaded, loaded.model, images), *(_model_run(loaded, view, images) for view in views)]
    unmerged, *settings = interleaved_seconds(runs, loaded, repeats, progress=progress)
    return unmerged, settings, views


def measure_latency(loaded: LoadedModel, batch_size: int, repeats: int = TABLE_REPEATS,
                    progress: Progress | None = None) -> LatencyModel:
    """Time the stem, one block's halves at every table point, the head and the whole unmerged model."""
    model = loaded.model
    block = model.blocks[0]
    dtype = next(model.parameters()).dtype
    images = torch.randn(batch_size, *loaded.data_config["input_size"], device=loaded.device, dtype=dtype)
    full, width = loaded.unmerged_tokens[0], model.embed_dim
    grid = token_grid(model.num_prefix_tokens + 1, full)

    def stem(x: Tensor) -> Tensor:
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))

    def attention_half(x: Tensor) -> Tensor:
        return x + block.ls1(block.attn(block.norm1(x)))

    def mlp_half(x: Tensor) -> Tensor:
        return x + block.ls2(block.mlp(block.norm2(x)))

    def head(x: Tensor) -> Tensor:
        return model.forward_head(model.norm(x))

    def bound(function: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[], object]:
        return lambda: function(x)

    tokens = {n: torch.randn(batch_size, n, width, device=loaded.device, dtype=dtype) for n in grid}
    attention, mlp = _compiled(attention_half, loaded), _compiled(mlp_half, loaded)
    runs = [bound(_compiled(stem, loaded), images), bound(_compiled(head, loaded), tokens[full]),
            *(bound(attention, tokens[n]) for n in grid), *(bound(mlp, tokens[n]) for n in grid),
            _model_run(loaded, model, images)]
    medians = [statistics.median(t) for t in interleaved_seconds(runs, loaded, repeats, progress=progress)]
    stem_s, head_s, whole = medians[0], medians[1], medians[-1]
    attention_s, mlp_s = medians[2:2 + len(grid)], medians[2 + len(grid):2 + 2 * len(grid)]
    latency = LatencyModel(LatencyKey.of(loaded, batch_size), stem_s, head_s, TokenTable(grid, tuple(attention_s)),
                           TokenTable(grid, tuple(mlp_s)))
    latency.scale = whole / latency.tables_seconds([full] * (len(model.blocks) + 1))
    return latency


def fit_step(latency: LatencyModel, loaded: LoadedModel, images: Tensor, configs: Sequence[MethodConfig],
             repeats: int = FIT_REPEATS, progress: Progress | None = None) -> StepCost:
    """Fit the step cost of the configs' method from whole-model runs of each on `images` (one batch of the
    model's batch size), interleaved with the unmerged model, and keep it in `latency.steps`."""
    from atm_cli.engine import last_trace

    names = {config.NAME for config in configs}
    if len(names) != 1:
        raise ValueError(f"fit_step takes settings of one method, got {sorted(names)}")
    times, settings, views = _beside_unmerged(loaded, images, configs, repeats, progress)
    depth = len(loaded.model.blocks)
    # Each round's runs at the table's load: scaled so that the unmerged model takes its predicted time.
    unmerged = latency.unmerged_seconds(depth)
    rescaled = [[t * unmerged / u for t, u in zip(row, times)] for row in settings]
    traces = [last_trace(view).tokens for view in views]
    unexplained = [statistics.median(row) - latency.tables_seconds(tokens) for row, tokens in zip(rescaled, traces)]
    per_block, per_token = fit_nonnegative(np.array([[depth, sum(tokens[:-1])] for tokens in traces], dtype=float),
                                           np.array(unexplained))
    cost = StepCost(per_block, per_token, len(configs))
    latency.steps[next(iter(names))] = cost
    return cost


def fit_nonnegative(blocks: np.ndarray, unexplained: np.ndarray) -> tuple[float, float]:
    """Least squares `blocks @ (per_block, per_token) ~ unexplained` with neither below zero: a step cannot
    save time, and on a noisy machine a free fit of two coefficients trades one against the other
    (a negative constant, a steep slope). A coefficient the free fit puts below zero is fixed at zero."""
    if len({row[1] for row in blocks}) >= 2:  # the token totals differ: both coefficients can be told
        (per_block, per_token), *_ = np.linalg.lstsq(blocks, unexplained, rcond=None)
        if per_block >= 0 and per_token >= 0:
            return float(per_block), float(per_token)
    options = []
    for column in (0, 1):  # one coefficient alone, the other zero
        x = blocks[:, column]
        value = max(0.0, float(x @ unexplained / (x @ x)))
        options.append((float(np.sum((x * value - unexplained) ** 2)), column, value))
    _, column, value = min(options)
    return (value, 0.0) if column == 0 else (0.0, value)


def device_latency(loaded: LoadedModel, images: Tensor, fits: dict[str, Sequence[MethodConfig]] | None = None,
                   folder: str | Path | None = None, progress: Progress | None = None) -> LatencyModel:
    """The latency model for `loaded` at the batch size of `images`: read from the cache, or measured; the
    step cost of each method in `fits` (name -> settings to fit on) that it lacks is fitted on `images`.
    Saved back whenever something was measured."""
    require_timm(loaded, "the latency model (a block's halves timed apart)")
    key, folder = LatencyKey.of(loaded, len(images)), cache_dir(folder)
    latency = read_cached(key, folder)
    measured = latency is None
    if latency is None:
        latency = measure_latency(loaded, len(images), progress=progress)
    for name, configs in (fits or {}).items():
        if name not in latency.steps:
            fit_step(latency, loaded, images, configs, progress=progress)
            measured = True
    if measured:
        write_cached(latency, folder)
    return latency


@dataclass(frozen=True)
class MeasuredSpeed:
    """A setting timed for real beside the unmerged model, interleaved: medians and the per-round speedups."""

    seconds: float  # per batch, median
    baseline_seconds: float
    speedup: float  # median of the rounds' unmerged / setting ratios
    speedup_low: float  # the lowest and highest of those ratios
    speedup_high: float
    repeats: int
    tokens: tuple[int, ...]  # the setting's trace in the timed runs (`Trace.tokens`)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def measure_speedups(loaded: LoadedModel, images: Tensor, configs: Sequence[MethodConfig],
                     repeats: int = 7, progress: Progress | None = None) -> list[MeasuredSpeed]:
    """Time each setting and the unmerged model on `images`, every round running each once in turn."""
    from atm_cli.engine import last_trace

    baseline, settings, views = _beside_unmerged(loaded, images, configs, repeats, progress)
    speeds = []
    for row, view in zip(settings, views):
        ratios = [u / t for u, t in zip(baseline, row)]
        speeds.append(MeasuredSpeed(statistics.median(row), statistics.median(baseline), statistics.median(ratios),
                                    min(ratios), max(ratios), repeats, tuple(last_trace(view).tokens)))
    return speeds
