"""Patch a timm VisionTransformer in place so that its forward pass merges tokens, and trace what it did."""
from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from .attention import attention_with_sizes
from .config import ATMConfig, MergeConfig, ToMeConfig, resolve_split_layer, threshold_schedule, tome_schedule
from .flops import BlockStep, Geometry
from .merge import adaptive_r, alternate_split, bipartite_match, merge_closure, merge_weighted, size_distinctive_split
from .pooling import check_pool_supported, pool_with_sizes

_STATE = "_atm_state"


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
    config: MergeConfig
    geometry: Geometry
    thresholds: list[float] | None = None
    split_layer: int = 0
    tome_r: list[int] = field(default_factory=list)
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


def patch(model: nn.Module, config: MergeConfig) -> nn.Module:
    """Make `model` merge tokens by `config` in every forward pass. Patching again replaces the config."""
    _check_supported(model)
    depth = len(model.blocks)
    state = _State(config=config, geometry=Geometry.of(model))
    if isinstance(config, ATMConfig):
        state.thresholds = threshold_schedule(config, depth)
        state.split_layer = resolve_split_layer(config, depth)
    elif isinstance(config, ToMeConfig):
        state.tome_r = tome_schedule(config.r, depth)
    else:
        raise TypeError(f"expected ATMConfig or ToMeConfig, got {type(config).__name__}")
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
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    batch, n_tokens, _ = x.shape
    size: Tensor | None = None  # None until the first merge: all sizes are 1
    source = torch.eye(n_tokens, device=x.device, dtype=x.dtype).expand(batch, -1, -1) if state.config.trace_source else None
    tokens, steps = [n_tokens], []
    for index, block in enumerate(model.blocks):
        y, metric = attention_with_sizes(block.attn, block.norm1(x), size if state.config.prop_attn else None)
        x = x + block.drop_path1(block.ls1(y))
        n_in = x.shape[1]
        merge_sum, similarity = _plan_merge(model, state, index, metric, size)
        if merge_sum is not None:
            x, size = merge_weighted(merge_sum, x, size)
            source = None if source is None else merge_sum(source)
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        steps.append(BlockStep(n_in, x.shape[1], similarity))
        tokens.append(x.shape[1])
    state.trace = Trace(
        tokens=tokens,
        merged=[a - b for a, b in zip(tokens, tokens[1:])],
        steps=steps,
        geometry=state.geometry,
        thresholds=state.thresholds,
        size=size,
        source=source,
    )
    return model.norm(x)


def _plan_merge(model: VisionTransformer, state: _State, index: int, metric: Tensor,
                size: Tensor | None) -> tuple[Callable[[Tensor], Tensor] | None, tuple[int, int, int]]:
    """Decide block `index`'s merge step: a merge closure (None: keep all tokens) and the similarity shape."""
    batch, n_tokens, head_dim = metric.shape
    num_prefix = model.num_prefix_tokens
    config = state.config
    if isinstance(config, ToMeConfig):
        r = min(state.tome_r[index], (n_tokens - num_prefix) // 2)
        if r <= 0:
            return None, (0, 0, 0)
        split = alternate_split(batch, n_tokens, num_prefix, metric.device)
        matching = bipartite_match(metric, *split)
        return merge_closure(matching, r, num_prefix), (split[0].shape[1], split[1].shape[1], head_dim)

    last = index == len(model.blocks) - 1
    # The head reads prefix tokens only (App. A); an `aux_head` (LV-ViT) reads the image tokens too.
    if last and config.prefix_only_last_block and model.global_pool == "token" and not hasattr(model, "aux_head"):
        return (lambda t: t[:, :num_prefix]), (0, 0, 0)
    if index < state.split_layer:  # block index + 1 <= split_layer
        split = alternate_split(batch, n_tokens, num_prefix, metric.device)
    else:
        split = size_distinctive_split(size, batch, n_tokens, num_prefix, metric.device)
    matching = bipartite_match(metric, *split)
    r = adaptive_r(matching, state.thresholds[index])
    similarity = (split[0].shape[1], split[1].shape[1], head_dim)
    return (merge_closure(matching, r, num_prefix) if r > 0 else None), similarity


def _pool_merged(model: VisionTransformer, x: Tensor, pool_type: str | None = None) -> Tensor:
    return pool_with_sizes(model, x, getattr(model, _STATE).trace.size, pool_type)
