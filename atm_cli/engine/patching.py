"""Patch a timm VisionTransformer in place so that its forward pass reduces tokens by a method, and trace it."""
from __future__ import annotations

import contextlib
import types
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from .attention import attention_with_sizes, unless_identity
from .flops import BlockStep, Geometry
from .methods import BlockInput, Deferred, MethodConfig, Plan, Reduction
from .pooling import check_pool_supported, pool_with_sizes

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
class _State:
    config: MethodConfig
    plan: Plan
    geometry: Geometry
    trace_source: bool
    trace: Trace | None = None


def _check_supported(model: nn.Module) -> None:
    name = type(model).__name__
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{name} is not a timm VisionTransformer: the engine needs its patch_embed, blocks and prefix tokens")
    for i, block in enumerate(model.blocks):
        if type(block).forward is not Block.forward:
            raise ValueError(f"{name}: block {i} is a {type(block).__name__}, not timm's pre-norm Block the engine patches")
        if type(block.attn).forward is not Attention.forward:
            raise ValueError(f"{name}: block {i} attention is {type(block.attn).__name__} (e.g. RoPE), not timm's Attention")
    check_pool_supported(model)


def patch(model: nn.Module, config: MethodConfig, trace_source: bool = False) -> nn.Module:
    """Make `model` reduce tokens by `config` in every forward pass. Patching again replaces the config.

    With `trace_source`, the trace also holds which input tokens each final token stands for.
    """
    _check_supported(model)
    if not isinstance(config, MethodConfig):
        raise TypeError(f"expected a method config (e.g. ATMConfig, ToMeConfig), got {type(config).__name__}")
    if model not in _GEOMETRY:  # shapes only; counting the stem runs torch's FLOP counter, so once a model
        _GEOMETRY[model] = Geometry.of(model)
    state = _State(config=config, plan=config.plan(model), geometry=_GEOMETRY[model], trace_source=trace_source)
    setattr(model, _STATE, state)
    model.forward_features = types.MethodType(_merging_forward_features, model)
    if model.global_pool in ("avg", "map"):
        model.pool = types.MethodType(_pool_merged, model)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the model's own forward (the class methods are found again once the overrides are gone)."""
    for attr in ("forward_features", "pool", _STATE):
        model.__dict__.pop(attr, None)
    return model


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


def _merging_forward_features(model: VisionTransformer, images: Tensor, attn_mask: Tensor | None = None,
                              is_causal: bool = False) -> Tensor:
    if attn_mask is not None or is_causal:
        raise ValueError("token merging does not support attention masks: the tokens they address are merged away")
    state: _State = getattr(model, _STATE)
    plan, prop_attn = state.plan, getattr(state.config, "prop_attn", False)
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    batch, n_tokens, _ = x.shape
    size: Tensor | None = None  # None until the first merge: all sizes are 1
    source = torch.eye(n_tokens, device=x.device, dtype=torch.float32).expand(batch, -1, -1) if state.trace_source else None
    tokens, steps = [n_tokens], []
    for index, block in enumerate(model.blocks):
        before, reduction = index in plan.before_attention, None
        if before:  # the step merges the block's input, and may hand the attention its probabilities
            reduction = reduce_in_float32(plan, BlockInput(index, x, size, x, None))
            x, size, source = _apply(reduction, x, size, source)
        y, metric, attention = attention_with_sizes(block.attn, block.norm1(x), size if prop_attn else None,
                                                    with_probabilities=index in plan.attention_blocks,
                                                    per_head=plan.per_head_attention,
                                                    probabilities=None if reduction is None else reduction.attention)
        x = x + unless_identity(block.drop_path1, unless_identity(block.ls1, y))
        n_in = x.shape[1]
        if not before:
            reduction = reduce_in_float32(plan, BlockInput(index, x, size, metric, attention))
            x, size, source = _apply(reduction, x, size, source)
        step_macs = 0 if reduction is None else reduction.extra_macs
        x = x + unless_identity(block.drop_path2, unless_identity(block.ls2, block.mlp(block.norm2(x))))
        steps.append(BlockStep(n_in, x.shape[1], step_macs))
        tokens.append(x.shape[1])
    state.trace = Trace(
        tokens=tokens,
        merged=[a - b for a, b in zip(tokens, tokens[1:])],
        steps=steps,
        geometry=state.geometry,
        thresholds=plan.thresholds,
        size=size,
        source=source,
    )
    return model.norm(x)


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


def _apply(reduction: Reduction | None, x: Tensor, size: Tensor | None,
           source: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    if reduction is None:
        return x, size, source
    return reduction.x, reduction.size, None if source is None else reduction.combine(source)


def _pool_merged(model: VisionTransformer, x: Tensor, pool_type: str | None = None) -> Tensor:
    return pool_with_sizes(model, x, getattr(model, _STATE).trace.size, pool_type)
