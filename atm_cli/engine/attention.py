"""A block's self-attention, with proportional attention and the merging metric (the keys)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .backbones.parts import AttentionParts, unless_identity


def attention_with_sizes(attn: AttentionParts, x: Tensor, size: Tensor | None, with_probabilities: bool = False,
                         per_head: bool = False,
                         probabilities: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Return the attention output, the keys averaged over heads (B, N, head_dim), and, when asked, the
    attention probabilities averaged over heads (B, N, N), which methods such as EViT score tokens by,
    or with `per_head` each head's own (B, H, N, N), which Zero-TPrune ranks tokens by.

    With `size`, each key's logit gets + log(size) (the paper's proportional attention, App. A):
    an additive float mask for `scaled_dot_product_attention`, so the fused kernel stays in use
    unless the probabilities are wanted. Given `probabilities` (B, H, N, N), which a method computed
    before merging (MCTF's one-step-ahead attention), replace softmax(q k^T): only the values are
    computed, and there are no keys to return.
    """
    batch, n_tokens, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    metric = returned = None
    if probabilities is not None:
        (v,) = attn.project(x, 2, 1)
        out = unless_identity(attn.attn_drop, probabilities.to(v.dtype)) @ v
    else:
        q, k, v = attn.project(x, 0, 3)
        q, k = unless_identity(attn.q_norm, q), unless_identity(attn.k_norm, k)
        metric = k.mean(dim=1)
        if attn.fused and not with_probabilities:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=log_size_bias(size, q.dtype),
                                                 dropout_p=_dropping(attn.attn_drop), scale=attn.sdpa_scale)
        else:
            weights = _softmax(attn, q, k, size)
            returned = (weights if per_head else weights.mean(dim=1)) if with_probabilities else None
            out = unless_identity(attn.attn_drop, weights) @ v

    out = unless_identity(attn.out_norm, out.transpose(1, 2).reshape(batch, n_tokens, -1))
    if gate is not None:
        out = out * gate
    return unless_identity(attn.proj_drop, attn.proj(out)), metric, returned


def head_probabilities(attn: AttentionParts, x: Tensor, size: Tensor | None) -> Tensor:
    """The attention probabilities of every head (B, H, N, N), with proportional attention; no values."""
    q, k = attn.project(x, 0, 2)
    return _softmax(attn, unless_identity(attn.q_norm, q), unless_identity(attn.k_norm, k), size)


def log_size_bias(size: Tensor | None, dtype) -> Tensor | None:
    """+ log(size) on each key's logit, as an additive mask (B, 1, 1, N) over (B, H, queries, keys)."""
    return None if size is None else size.log().to(dtype).reshape(size.shape[0], 1, 1, size.shape[1])


def _dropping(module: nn.Module) -> float:
    return module.p if isinstance(module, nn.Dropout) and module.training else 0.0


def _softmax(attn: AttentionParts, q: Tensor, k: Tensor, size: Tensor | None) -> Tensor:
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    bias = log_size_bias(size, q.dtype)
    return (logits if bias is None else logits + bias).softmax(dim=-1)
