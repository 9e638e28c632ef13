"""Patch a Vision Transformer in place so that its forward pass reduces tokens by a method, and trace it.

One merging forward serves every model family: `backbones/` describes the model's blocks and says where
the forward goes in (timm: `forward_features`; transformers and open_clip: each layer's forward)."""
from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .attention import attention_with_sizes
from .backbones import backbone_of
from .backbones.parts import BlockParts, Hook, MergingRun, through
from .flops import BlockStep, Geometry
from .methods import BlockInput, Deferred, MethodConfig, Padded, Plan, Reduction

_STATE = "_atm_state"
_GEOMETRY: "weakref.WeakKeyDictionary[nn.Module, Geometry]" = weakref.WeakKeyDictionary()


@dataclass
class Trace:
    """What the last forward pass did (one batch; every image keeps the same token count)."""

    tokens: list[int]  # tokens entering each block, then tokens leaving the last block (L + 1 values)
    merged: list[int]  # tokens removed in each block (L values)
    steps: list[BlockStep]
    geometry: Geometry
    thresholds: list[float] | None = None  # ATM only
    size: Tensor | None = None  # (B, N_final, 1) merging sizes; None when nothing merged
    source: Tensor | None = None  # (B, N_final, N_0) which input tokens each final token holds (trace_source)

    @property
    def gflops(self) -> float:
        return self.geometry.gflops(self.steps, self.tokens[-1])


@dataclass
class _Pass:
    """One forward pass in progress: the running merging sizes, source maps and token counts."""

    size: Tensor | None  # None until the first merge: all sizes are 1
    source: Tensor | None
    tokens: list[int]  # the sequence's length entering each block (unpadded passes: the trace's counts)
    steps: list[BlockStep] = field(default_factory=list)  # real counts: 0-d tensors where padding was
    real: Tensor | None = None  # how many tokens are real when the sequence ends in padding (size 0)

    @classmethod
    def entering(cls, x: Tensor, trace_source: bool) -> "_Pass":
        batch, n_tokens, _ = x.shape
        source = torch.eye(n_tokens, device=x.device, dtype=torch.float32).expand(batch, -1, -1) if trace_source else None
        return cls(None, source, [n_tokens])

    def apply(self, reduction: Reduction | Padded | None, x: Tensor) -> Tensor:
        if reduction is None:
            return x
        if isinstance(reduction, Padded):
            x, self.size, self.source, self.real = _cut_on_host(reduction, self.source)
            return x
        self.size = reduction.size
        self.source = None if self.source is None else reduction.combine(self.source)
        self.real = reduction.real_tokens
        return reduction.x

    def real_tokens(self, x: Tensor) -> "int | Tensor":
        return x.shape[1] if self.real is None else self.real


@dataclass(eq=False)  # hashed by identity: a WeakSet holds the states sharing a module
class _State:
    config: MethodConfig
    plan: Plan
    blocks: Sequence[BlockParts]
    geometry: Geometry
    trace_source: bool
    token_bucket: int = 1  # `patch`'s: pad data-dependent token counts to multiples of it (compiled ATM)
    hooks: list[Hook] = field(default_factory=list)
    trace: Trace | None = None
    final_size: Tensor | None = None  # the sizes the head pools with (padding included)
    running: _Pass | None = None  # between the layers of a model hooked block by block
    inside: dict[tuple[int, str], Callable] = field(default_factory=dict)  # its hooks in modules it may share


def patch(model: nn.Module, config: MethodConfig, trace_source: bool = False, token_bucket: int = 1) -> nn.Module:
    """Make `model` reduce tokens by `config` in every forward pass. Patching again replaces the config.

    With `trace_source`, the trace also holds which input tokens each final token stands for. With
    `token_bucket` > 1, a method whose token counts depend on the data (ATM) pads each block's tokens
    with tokens of size 0 (masked out of attention, merging and pooling) up to a multiple of it: the
    same logits and trace, computed on fewer distinct shapes, for a compiled model (`compiled.py`). An output
    that is the token sequence itself (timm's `forward_features`, transformers' `last_hidden_state`) then
    ends in the padding rows; `last_trace(model).tokens[-1]` says how many come before them.
    """
    if token_bucket < 1:
        raise ValueError(f"token_bucket must be at least 1, got {token_bucket}")
    backbone = backbone_of(model)
    if not isinstance(config, MethodConfig):
        raise TypeError(f"expected a method config (e.g. ATMConfig, ToMeConfig), got {type(config).__name__}")
    unpatch(model)
    if model not in _GEOMETRY:  # shapes only; counting the stem runs torch's FLOP counter, so once a model
        _GEOMETRY[model] = Geometry.of(backbone)
    state = _State(config=config, plan=config.plan(backbone), blocks=backbone.blocks, geometry=_GEOMETRY[model],
                   trace_source=trace_source, token_bucket=token_bucket)
    state.hooks = backbone.hooks(MergingRun(blocks=functools.partial(_all_blocks, state),
                                            block=functools.partial(_one_block, state),
                                            sizes=functools.partial(_final_sizes, state)))
    inside = [(module, name, replacement) for module, name, replacement in state.hooks if module is not model]
    for module, name, replacement in state.hooks:
        if module is model:
            setattr(model, name, replacement)
    if inside:  # hooks in modules the model may share with copies of it: they act while this model runs
        for module, name, replacement in inside:
            _share(module, name, state, replacement)
        model.forward = _running_as(state, model.__dict__.get("forward") or model.forward)
    setattr(model, _STATE, state)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the model's own forward (the class methods are found again once the overrides are gone)."""
    state = model.__dict__.pop(_STATE, None)
    for module, name, _ in [] if state is None else state.hooks:
        if module is model:
            model.__dict__.pop(name, None)
        else:
            _unshare(module, name, state)
            model.__dict__.pop("forward", None)
    return model


# The patched models whose forward is running, innermost last: a hook inside a module that several patched
# views of one model share (`copy.copy(model)`, patched each for its own setting) acts for the one running.
_RUNNING: list[_State] = []
# module -> attribute -> the patched models with a hook there (weakly: a view dropped unpatched leaves).
_SHARED: "weakref.WeakKeyDictionary[nn.Module, dict[str, weakref.WeakSet]]" = weakref.WeakKeyDictionary()


def _running_as(state: _State, forward: Callable) -> Callable:
    def forward_merging(*args, **kwargs):
        _RUNNING.append(state)
        try:
            return forward(*args, **kwargs)
        finally:
            _RUNNING.pop()

    return forward_merging


def _share(module: nn.Module, name: str, state: _State, replacement: Callable) -> None:
    state.inside[(id(module), name)] = replacement
    sharers = _SHARED.setdefault(module, {}).setdefault(name, weakref.WeakSet())
    if name not in module.__dict__:
        own, key = getattr(type(module), name), (id(module), name)

        def dispatch(*args, **kwargs):
            chosen = _RUNNING[-1].inside.get(key) if _RUNNING else None
            return own(module, *args, **kwargs) if chosen is None else chosen(*args, **kwargs)

        setattr(module, name, dispatch)
    sharers.add(state)


def _unshare(module: nn.Module, name: str, state: _State) -> None:
    sharers = _SHARED.get(module, {}).get(name)
    if sharers is not None:
        sharers.discard(state)
        if not sharers:
            module.__dict__.pop(name, None)


@contextlib.contextmanager
def merging(model: nn.Module, config: MethodConfig | None, trace_source: bool = False) -> Iterator[nn.Module]:
    """`with merging(model, config):` patch for the block, unpatch after it (None: the unmerged model)."""
    if config is None:
        yield model
        return
    patch(model, config, trace_source)
    try:
        yield model
    finally:
        unpatch(model)


def last_trace(model: nn.Module) -> Trace:
    state = getattr(model, _STATE, None)
    if state is None or state.trace is None:
        raise ValueError("no trace: patch the model and run a forward pass first")
    return state.trace


def _all_blocks(state: _State, x: Tensor) -> Tensor:
    running = _Pass.entering(x, state.trace_source)
    for index, parts in enumerate(state.blocks):
        x = _block(state, index, parts, x, running)
    _finish(state, running)
    return x


def _one_block(state: _State, index: int, x: Tensor) -> Tensor:
    if index == 0:
        state.running = _Pass.entering(x, state.trace_source)
    running = state.running
    if running is None or len(running.steps) != index or (state.token_bucket == 1 and running.tokens[-1] != x.shape[1]):
        raise ValueError(f"block {index} of a merging model ran out of order: the blocks must run in turn, from block 0")
    x = _block(state, index, state.blocks[index], x, running)
    if index == len(state.blocks) - 1:
        _finish(state, running)
        state.running = None
    return x


def _final_sizes(state: _State) -> Tensor | None:
    return state.final_size


def _block(state: _State, index: int, parts: BlockParts, x: Tensor, running: _Pass) -> Tensor:
    plan, prop_attn = state.plan, getattr(state.config, "prop_attn", False)
    before, reduction = index in plan.before_attention, None
    if before:  # the step merges the block's input, and may hand the attention its probabilities
        reduction = reduce_in_float32(plan, BlockInput(index, x, running.size, x, None, state.token_bucket))
        x = running.apply(reduction, x)
    keys_size = running.size if prop_attn else None  # each key's log(size) on its logits: log 0 masks padding
    if not prop_attn and running.real is not None:  # no size term, but padding still stays out of attention
        keys_size = (running.size > 0).to(running.size.dtype)
    y, metric, attention = attention_with_sizes(parts.attn, parts.norm1(x), keys_size,
                                                with_probabilities=index in plan.attention_blocks,
                                                per_head=plan.per_head_attention,
                                                probabilities=None if reduction is None else reduction.attention)
    x = x + through(parts.after_attention, y)
    n_in = running.real_tokens(x)
    if not before:
        reduction = reduce_in_float32(plan, BlockInput(index, x, running.size, metric, attention, state.token_bucket))
        x = running.apply(reduction, x)
    step_macs = 0 if reduction is None else reduction.extra_macs
    x = x + through(parts.after_mlp, parts.mlp(parts.norm2(x)))
    running.steps.append(BlockStep(n_in, running.real_tokens(x), step_macs))
    if state.token_bucket == 1:  # a padded pass keeps no lengths: a compiled graph would be keyed on their history
        running.tokens.append(x.shape[1])
    return x


def _finish(state: _State, running: _Pass) -> None:
    state.final_size = running.size
    if state.token_bucket > 1:
        _finish_padded(state, running)
        return
    state.trace = _trace(state, running.tokens, running.steps, running.size, running.source)


def _trace(state: _State, tokens: list[int], steps: list[BlockStep], size: Tensor | None,
           source: Tensor | None) -> Trace:
    return Trace(tokens=tokens, merged=[a - b for a, b in zip(tokens, tokens[1:])], steps=steps,
                 geometry=state.geometry, thresholds=state.plan.thresholds, size=size, source=source)


@torch.compiler.disable
def _finish_padded(state: _State, running: _Pass) -> None:
    """The trace of a padded pass: its real counts read from the device at once (the pass's one read beyond its
    decisions), its sizes and source maps without the padding. Outside any graph: a compiled model is not
    specialised on these counts."""
    steps = running.steps
    values = [value for step in steps for value in (step.tokens_in, step.tokens_after_merge, step.step_macs)]
    tensors = [value for value in values if isinstance(value, Tensor)]
    read = iter(torch.stack(tensors).tolist()) if tensors else iter(())
    values = [next(read) if isinstance(value, Tensor) else value for value in values]
    steps = [BlockStep(*values[i:i + 3]) for i in range(0, len(values), 3)]
    tokens = [steps[0].tokens_in] + [step.tokens_after_merge for step in steps]
    real = tokens[-1]
    state.trace = _trace(state, tokens, steps, None if running.size is None else running.size[:, :real],
                         None if running.source is None else running.source[:, :real])


def reduce_in_float32(plan: Plan, block: BlockInput) -> Reduction | None:
    """The plan's step with autocast off: scores, thresholds and size-weighted sums in float32 whatever
    precision the model runs in (a threshold compared on the bfloat16 grid, spacing 0.004 near 0.9,
    would move token counts between precisions; x * size overflows float16)."""
    device_type = block.x.device.type
    # Not on (e.g. the meta device: shapes only, no autocast): no context to leave, and one less per block.
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return _step(plan, block)
    with torch.autocast(device_type, enabled=False):
        return _step(plan, block)


def _step(plan: Plan, block: BlockInput) -> Reduction | None:
    reduction = plan.step(block)
    if isinstance(reduction, Deferred):
        reduction = reduction.finish(_decide_on_host(reduction))
    return reduction


@torch.compiler.disable
def _decide_on_host(deferred: Deferred) -> int:
    """The step's one host synchronisation, and its decision, outside any compiled graph: a compiled
    model's next graph is specialised on the decision (ATM's r), not on the count it came from."""
    return deferred.decide(int(deferred.total.item()))


@torch.compiler.disable
def _cut_on_host(padded: Padded, source: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """A padded step's tokens, sizes, source maps and real count, its padding cut to the next multiple of its
    bucket: the step's one host read, outside any graph, so that the next compiled segment is specialised on
    the length that follows (a handful per block), not on r."""
    r, real = padded.r_and_real.tolist()
    chosen = padded.unchanged if r == 0 else padded.merged
    length = chosen.x.shape[1] if r == 0 else min(-(-real // padded.bucket) * padded.bucket, chosen.x.shape[1])

    def cut(t: Tensor | None) -> Tensor | None:  # contiguous: a view's strides would key the next graph on r too
        return None if t is None else t[:, :length].contiguous()

    return cut(chosen.x), cut(chosen.size), cut(None if source is None else chosen.combine(source)), chosen.real_tokens
