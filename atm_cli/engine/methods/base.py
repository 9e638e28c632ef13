"""What every merging or pruning method is made of, without torch (the CLI lists methods and reads presets
without loading it).

A method is a frozen dataclass subclassing `MethodConfig`: its `PARAMS` say each parameter's name,
type, default, valid range and help; `to_params`/`from_params` are its one codec to plain values
(presets, `--set`, JSON); `plan(backbone)` (the model in `backbones.parts` terms) builds the per-block
reduction step that the patched forward pass calls (that is where torch comes in, imported inside `plan`).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from torch import Tensor

    from ..backbones.parts import Backbone

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


@dataclass(frozen=True)
class Param:
    """One parameter of a method: `kind` is float, int, bool, 'ints' (an int, or one int per block) or 'floats'
    (one number per block)."""

    name: str
    kind: Any
    help: str
    low: float | None = None  # inclusive, unless low_open
    high: float | None = None  # inclusive
    low_open: bool = False
    optional: bool = False  # None is a value (e.g. "the model's default")

    def coerce(self, value: Any) -> Any:
        """A value from YAML, JSON, Python or a `--set` string, as this parameter's type; ValueError otherwise."""
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            if self.optional:
                return None
            raise ValueError(f"{self.name} needs a value")
        if isinstance(value, str):
            value = self._parse(value)
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{self.name} must be true or false, got {value!r}")
            return value
        if self.kind in ("ints", "floats"):
            values = [value] if not isinstance(value, (list, tuple)) else list(value)
            numbers = (int,) if self.kind == "ints" else (int, float)
            if not values or not all(isinstance(v, numbers) and not isinstance(v, bool) for v in values):
                expected = "an integer or a list of integers" if self.kind == "ints" else "a list of numbers"
                raise ValueError(f"{self.name} must be {expected}, got {value!r}")
            for v in values:
                self._check_range(v)
            if self.kind == "floats":
                return tuple(float(v) for v in values)
            return values[0] if not isinstance(value, (list, tuple)) else tuple(values)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.kind is int and not isinstance(value, int)):
            raise ValueError(f"{self.name} must be {'an integer' if self.kind is int else 'a number'}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{self.name} must be finite, got {value!r}")
        self._check_range(value)
        return float(value) if self.kind is float else value

    def _parse(self, text: str) -> Any:
        try:
            if self.kind is bool:
                if text.lower() in _TRUE + _FALSE:
                    return text.lower() in _TRUE
                raise ValueError
            if self.kind in ("ints", "floats"):
                values = tuple((int if self.kind == "ints" else float)(part) for part in text.split(","))
                return values[0] if len(values) == 1 and self.kind == "ints" else values
            return self.kind(text)
        except ValueError:
            raise ValueError(f"{self.name}: cannot read {text!r} as {self.describe_kind()}") from None

    def _check_range(self, value: float) -> None:
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and value > self.high
        if too_low or too_high:
            raise ValueError(f"{self.name} must lie in {self.describe_range()}, got {value!r}")

    def describe_kind(self) -> str:
        return {float: "a number", int: "an integer", bool: "true or false",
                "floats": "a comma list of numbers"}.get(self.kind, "an integer or a comma list")

    def describe_range(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{low}, {high}{']' if self.high is not None else ')'}"


@dataclass(frozen=True)
class Knob:
    """A one-parameter family of settings, which the stress test and the comparison climb: step 0 reduces
    nothing, each step up reduces more (by design; accuracy need not fall monotonically), `top` the most.
    A method's own knob (`MethodConfig.knob`) bears the method's name; the paper's Fig. 5 schedules are
    knobs of their own (`tome.ramp_knob`, `atm.constant_knob`)."""

    name: str  # the family's name in reports: a method's NAME, or e.g. "tome-increasing"
    description: str
    param: str  # the parameter it moves, e.g. "r" or "keep_rate"
    top: int
    config: Callable[[int], "MethodConfig"]
    shown: Callable[[int], dict] | None = None  # a step as reports show it (None: the parameter's value)

    def params(self, step: int) -> dict:
        """Step `step` as reports show it, e.g. {"r": 13}."""
        return self.shown(step) if self.shown is not None else {self.param: getattr(self.config(step), self.param)}


class MethodConfig:
    """Base of every method's frozen dataclass config: validation and the plain-values codec."""

    NAME: ClassVar[str]
    SUMMARY: ClassVar[str]
    PARAMS: ClassVar[tuple[Param, ...]]
    # Token counts follow from the input's shape alone, and each image is reduced independently of the others:
    # a compiled model then needs one graph per batch size, and a short batch may be padded to it.
    FIXED_SHAPES: ClassVar[bool] = True

    def __post_init__(self) -> None:
        for param in self.PARAMS:
            value = param.coerce(getattr(self, param.name))  # list -> tuple keeps configs hashable
            object.__setattr__(self, param.name, value)

    def to_params(self) -> dict[str, Any]:
        """The parameters as plain YAML/JSON values (tuples become lists)."""
        return {p.name: list(v) if isinstance(v := getattr(self, p.name), tuple) else v for p in self.PARAMS}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "MethodConfig":
        """Build from plain values; unknown names and missing required ones are errors (ValueError)."""
        known = {p.name for p in cls.PARAMS}
        unknown = [name for name in params if name not in known]
        if unknown:
            raise ValueError(f"unknown parameter {unknown[0]!r} for {cls.NAME} (known: {', '.join(sorted(known))})")
        required = [f.name for f in dataclasses.fields(cls) if f.name in known and
                    f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in params]
        if missing:
            raise ValueError(f"{cls.NAME} needs {', '.join(missing)}")
        return cls(**params)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each parameter's default (required ones are absent)."""
        return {f.name: f.default for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING and f.name in {p.name for p in cls.PARAMS}}

    @classmethod
    def knob(cls, depth: int, image_tokens: int) -> Knob | None:
        """The method's natural knob for a model of `depth` blocks and `image_tokens` patches (None: none)."""
        return None

    @classmethod
    def own_knob(cls, param: str, top: int, config: Callable[[int], "MethodConfig"]) -> Knob:
        """A knob of this method moving `param`, named and described as the method is."""
        return Knob(cls.NAME, cls.SUMMARY, param, top, config)

    def plan(self, model: "Backbone") -> "Plan":
        raise NotImplementedError


def block_indices(method: str, blocks, depth: int) -> frozenset[int]:
    """A method's 0-based `blocks` (an int or ints) as a set, refusing any beyond a `depth`-block model."""
    indices = frozenset((blocks,) if isinstance(blocks, int) else blocks)
    beyond = sorted(b for b in indices if b >= depth)
    if beyond:
        raise ValueError(f"{method} block {beyond[0]} does not exist in a {depth}-block model (blocks count from 0)")
    return indices


@dataclass
class BlockInput:
    """What a block's reduction step sees, between the block's attention and its MLP (or, in the plan's
    `before_attention` blocks, before the attention: then `x` is the block's input and `metric` is `x`)."""

    index: int  # 0-based block index
    x: "Tensor"  # (B, N, C) the residual stream after attention
    size: "Tensor | None"  # (B, N, 1) merging sizes; None while every size is 1
    metric: "Tensor"  # (B, N, head_dim) the attention's keys averaged over heads
    attention: "Tensor | None"  # (B, N, N) attention probabilities averaged over heads (or (B, H, N, N)), when asked
    # The compiled path's token bucket: a step whose token count depends on the data may pad its output with
    # tokens of size 0 up to a multiple of it, so that few shapes occur (1: exact counts, no padding).
    token_bucket: int = 1


@dataclass
class Reduction:
    """A block's reduction: the new tokens and sizes, and how any additive per-token map follows them."""

    x: "Tensor"
    size: "Tensor | None"  # None: every size is still 1
    combine: Callable[["Tensor"], "Tensor"]  # e.g. source maps (B, N, N_0) -> (B, N', N_0)
    extra_macs: int = 0  # the step's own multiply-adds per image (similarities, scores), for GFLOPs
    # Before the attention only: (B, H, N', N') probabilities the block's attention uses instead of its own.
    attention: "Tensor | None" = None
    # A padded output (see `Padded`): how many of its tokens are real (a 0-d tensor, all images alike); they
    # come first, the padding after them has size 0. `extra_macs` may then be a 0-d tensor too: the host reads
    # the counts of a padded pass once, at its end.
    real_tokens: "Tensor | None" = None


@dataclass
class Deferred:
    """A reduction that waits for one integer from the host: `decide` turns `total` (a 0-d integer tensor, e.g.
    ATM's count of pairs above the threshold over the batch) into r, `finish(r)` is the reduction.

    The engine reads `total` and runs `decide` outside any compiled graph, so that a compiled model
    specialises its next segment on r itself, not on the raw count (fewer distinct segments)."""

    total: "Tensor"
    decide: Callable[[int], int]
    finish: Callable[[int], "Reduction | None"]


@dataclass
class Padded:
    """A data-dependent reduction computed whole in the graph, at the input's length (`BlockInput.token_bucket`
    > 1): `merged` holds the real tokens first (`merged.real_tokens` of them), then padding of size 0. The
    engine reads r and that count on the host and cuts the padding to the next multiple of `bucket`
    (`unchanged` when r is 0), outside any graph: the next compiled segment depends on that length alone."""

    merged: Reduction
    unchanged: Reduction
    r_and_real: "Tensor"  # (2,) integers: r, and the real tokens after merging
    bucket: int

    @property
    def extra_macs(self) -> "Tensor | int":
        return self.merged.extra_macs


@dataclass
class Plan:
    """A method made concrete for one model: its step, and the blocks that need attention probabilities."""

    step: Callable[[BlockInput], "Reduction | Deferred | Padded | None"]
    attention_blocks: frozenset[int] = frozenset()
    thresholds: list[float] | None = None  # ATM's per-block thresholds, for traces and plots
    per_head_attention: bool = False  # those blocks' attention per head (B, H, N, N) instead of the head mean
    before_attention: frozenset[int] = frozenset()  # blocks whose step runs before the attention (MCTF)
