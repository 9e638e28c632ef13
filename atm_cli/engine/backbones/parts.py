"""What the engine needs from a Vision Transformer, whichever library built it.

A pre-norm ViT is, to the engine: a stem that turns images into patch tokens, prefix tokens (class,
distillation, registers) that are never merged, a stack of blocks `x + A(norm1(x))`, `x + M(norm2(x))`
whose attention it recomputes (to add the merging sizes' log-bias and read the keys), and a head that
pools the tokens left. A family adapter (`timm_vit`, `transformers_vit`, `open_clip_vit`) describes a
model in these terms and says where the patched forward hooks in; everything else is one engine.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

IDENTITY = nn.Identity()

# (module, attribute, replacement): what `patch` sets on the model's modules and `unpatch` removes again.
Hook = tuple[nn.Module, str, Callable]


@dataclass(frozen=True)
class AttentionParts:
    """One block's multi-head self-attention, as the engine computes it (`attention.attention_with_sizes`)."""

    num_heads: int
    head_dim: int
    scale: float
    # (x, first, count) -> `count` of the queries, keys, values (in that order, from `first`), each (B, H, N, head_dim)
    project: Callable[[Tensor, int, int], tuple[Tensor, ...]]
    proj: nn.Module  # the output projection
    linear_macs: int  # per token: the q, k, v and output projections
    fused: bool = True  # scaled_dot_product_attention may run it (timm's `fused_attn`)
    sdpa_scale: float | None = None  # what the library passes scaled_dot_product_attention (None: 1/sqrt(head_dim))
    q_norm: nn.Module = IDENTITY
    k_norm: nn.Module = IDENTITY
    out_norm: nn.Module = IDENTITY  # on the heads' concatenated output, before `proj`
    gate: nn.Module | None = None  # sigmoid(gate(x)) scales the heads' output
    attn_drop: nn.Module = IDENTITY
    proj_drop: nn.Module = IDENTITY

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim


@dataclass(frozen=True)
class BlockParts:
    """A pre-norm block: x + after_attention(attn(norm1(x))), then x + after_mlp(mlp(norm2(x)))."""

    norm1: nn.Module
    attn: AttentionParts
    norm2: nn.Module
    mlp: nn.Module
    mlp_macs: int  # per token
    after_attention: tuple[nn.Module, ...] = ()  # layer scale, drop path, dropout, in the order they apply
    after_mlp: tuple[nn.Module, ...] = ()


@dataclass(frozen=True)
class Stem:
    """The module that makes patch tokens, and the input it is counted at (GFLOPs per patch)."""

    module: nn.Module
    in_chans: int
    image_size: tuple[int, int]
    num_patches: int


@dataclass(frozen=True)
class Backbone:
    """A model as the engine sees it: the methods' plans read `blocks` and `num_prefix_tokens`, the GFLOPs
    count the rest, and `hooks(run)` says where the merging forward goes into the model's own forward."""

    name: str  # the model's class, for messages
    blocks: Sequence[BlockParts]
    num_prefix_tokens: int
    has_class_token: bool  # the first prefix token is a class token (EViT ranks tokens by its attention)
    width: int
    stem: Stem
    head_macs: int  # per image: pooling, pre-logits and classifier, after the final norm
    # An exact ATM shortcut (App. A): the output reads the prefix tokens alone, so the last MLP can skip the rest.
    head_reads_prefix_only: bool
    hooks: Callable[["MergingRun"], list[Hook]]
    token_head_macs: int = 0  # per image token left after the blocks, of what reads each (an aux head, MAP keys)


class Wrapper(nn.Module):
    """A module around the model the engine merges (`inner`): e.g. logits from a transformers classifier's
    output, or a zero-shot classifier around a CLIP tower. Patching the wrapper merges `inner`'s tokens."""

    inner: nn.Module


@dataclass(frozen=True)
class MergingRun:
    """What the engine hands an adapter's hooks: the merging forward, whole or block by block, and the
    merging sizes of the last pass (for a head that pools tokens)."""

    blocks: Callable[[Tensor], Tensor]  # every block, in order
    block: Callable[[int, Tensor], Tensor]  # block `index` alone (a layer's forward); the last one ends the trace
    sizes: Callable[[], Tensor | None]  # (B, N, 1) sizes of the tokens the last pass left; None: nothing merged


def through(modules: tuple[nn.Module, ...], x: Tensor) -> Tensor:
    for module in modules:
        x = unless_identity(module, x)
    return x


def unless_identity(module: nn.Module, x: Tensor) -> Tensor:
    """`module(x)`, without the call when the module returns x as it is (nn.Identity, dropout that drops
    nothing): each module call costs Python time in every block, which a host-bound forward feels."""
    if type(module) is nn.Identity or (isinstance(module, nn.Dropout) and (module.p == 0 or not module.training)):
        return x
    return module(x)


def linear_macs(module: nn.Module) -> int:
    """Multiply-adds per token of every Linear inside `module`."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def fused_projection(weight: Tensor, bias: Tensor | None, num_heads: int,
                     head_dim: int) -> Callable[[Tensor, int, int], tuple[Tensor, ...]]:
    """Queries, keys and values from one (3 * H * head_dim, C) projection, computing only the rows asked for."""
    rows_per = num_heads * head_dim

    def project(x: Tensor, first: int, count: int) -> tuple[Tensor, ...]:
        batch, n_tokens, _ = x.shape
        w, b = weight, bias
        if count < 3:
            rows = slice(first * rows_per, (first + count) * rows_per)
            w, b = w[rows], None if b is None else b[rows]
        projected = F.linear(x, w, b)
        return projected.reshape(batch, n_tokens, count, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    return project


def separate_projections(linears: tuple[nn.Linear, nn.Linear, nn.Linear], num_heads: int,
                         head_dim: int) -> Callable[[Tensor, int, int], tuple[Tensor, ...]]:
    """Queries, keys and values from three Linear layers (transformers' q_proj, k_proj, v_proj)."""

    def project(x: Tensor, first: int, count: int) -> tuple[Tensor, ...]:
        batch, n_tokens, _ = x.shape
        return tuple(linear(x).reshape(batch, n_tokens, num_heads, head_dim).transpose(1, 2)
                     for linear in linears[first:first + count])

    return project
