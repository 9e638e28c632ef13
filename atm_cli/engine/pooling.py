"""The head's pooling over merged tokens: a token that stands for k patches weighs k times."""
from __future__ import annotations

from torch import Tensor, nn
from timm.layers import AttentionPoolLatent
from timm.models.vision_transformer import VisionTransformer

from .attention import log_size_bias

# Pools whose result does not change when a token is replaced by k copies of itself, once sizes are honoured.
SUPPORTED_POOLS = ("token", "avg", "map")


def check_pool_supported(model: VisionTransformer) -> None:
    """Raise ValueError unless the head pools in a way that `pool_with_sizes` reproduces over merged tokens."""
    name = type(model).__name__
    if model.global_pool not in SUPPORTED_POOLS:
        raise ValueError(f"{name}: global_pool={model.global_pool!r} is not supported (needs one of {SUPPORTED_POOLS})")
    pool = getattr(model, "attn_pool", None)
    if model.global_pool == "map":
        if getattr(type(pool), "forward", None) is not AttentionPoolLatent.forward:
            raise ValueError(f"{name}: attention pool {type(pool).__name__} is not timm's AttentionPoolLatent")
        if pool.pos_embed is not None:
            raise ValueError(f"{name}: the attention pool adds a per-position embedding, which merged tokens no longer have")
    elif pool is not None:
        raise ValueError(f"{name}: global_pool={model.global_pool!r} with an attention pool is not supported")


def pool_with_sizes(model: VisionTransformer, x: Tensor, size: Tensor | None, pool_type: str | None = None) -> Tensor:
    """timm's `VisionTransformer.pool`, with each token weighted by its merging size (`size` None: all 1)."""
    pool_type = pool_type or model.global_pool
    if size is None or (model.attn_pool is None and pool_type != "avg"):
        return VisionTransformer.pool(model, x, pool_type)
    if not model.pool_include_prefix:
        x, size = x[:, model.num_prefix_tokens:], size[:, model.num_prefix_tokens:]
    if model.attn_pool is not None:
        return attention_pool_with_sizes(model.attn_pool, x, size)
    return sized_mean(x, size)


def sized_mean(x: Tensor, size: Tensor) -> Tensor:
    """The mean of tokens (B, N, C) as if each were repeated `size` (B, N, 1) times."""
    return ((x.float() * size).sum(dim=1) / size.sum(dim=1)).to(x.dtype)  # float32 sums: no float16 overflow


def attention_pool_with_sizes(pool: nn.Module, x: Tensor, size: Tensor) -> Tensor:
    """The latent query attends with + log(size) on each key: softmax weights as if each token were repeated."""
    return pool(x, attn_mask=log_size_bias(size, x.dtype))
