"""timm's Attention forward, with proportional attention and the merging metric (the keys)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import Attention


def attention_with_sizes(attn: Attention, x: Tensor, size: Tensor | None, with_probabilities: bool = False,
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
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    metric = returned = None
    if probabilities is not None:
        (v,) = _heads(attn, x, 2, 1)
        out = unless_identity(attn.attn_drop, probabilities.to(v.dtype)) @ v
    else:
        q, k, v = _heads(attn, x, 0, 3)
        q, k = unless_identity(attn.q_norm, q), unless_identity(attn.k_norm, k)
        metric = k.mean(dim=1)
        if attn.fused_attn and not with_probabilities:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=_log_size(size, q.dtype),
                                                 dropout_p=attn.attn_drop.p if attn.training else 0.0)
        else:
            weights = _softmax(attn, q, k, size)
            returned = (weights if per_head else weights.mean(dim=1)) if with_probabilities else None
            out = unless_identity(attn.attn_drop, weights) @ v

    out = unless_identity(attn.norm, out.transpose(1, 2).reshape(batch, n_tokens, -1))
    if gate is not None:
        out = out * gate
    return unless_identity(attn.proj_drop, attn.proj(out)), metric, returned


def head_probabilities(attn: Attention, x: Tensor, size: Tensor | None) -> Tensor:
    """The attention probabilities of every head (B, H, N, N), with proportional attention; no values."""
    q, k = _heads(attn, x, 0, 2)
    return _softmax(attn, unless_identity(attn.q_norm, q), unless_identity(attn.k_norm, k), size)


def unless_identity(module: nn.Module, x: Tensor) -> Tensor:
    """`module(x)`, without the call when the module returns x as it is (nn.Identity, dropout that drops
    nothing): each module call costs Python time in every block, which a host-bound forward feels."""
    if type(module) is nn.Identity or (isinstance(module, nn.Dropout) and (module.p == 0 or not module.training)):
        return x
    return module(x)


def _heads(attn: Attention, x: Tensor, first: int, count: int) -> tuple[Tensor, ...]:
    """`count` of queries, keys, values (in that order, from `first`), (B, H, N, head_dim) each, computing
    only their rows of the qkv projection."""
    batch, n_tokens, _ = x.shape
    weight, bias = attn.qkv.weight, attn.qkv.bias
    if count < 3:
        rows = slice(first * attn.num_heads * attn.head_dim, (first + count) * attn.num_heads * attn.head_dim)
        weight, bias = weight[rows], None if bias is None else bias[rows]
    projected = F.linear(x, weight, bias)
    return projected.reshape(batch, n_tokens, count, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)


def _log_size(size: Tensor | None, dtype) -> Tensor | None:
    return None if size is None else size.log().to(dtype).reshape(size.shape[0], 1, 1, size.shape[1])


def _softmax(attn: Attention, q: Tensor, k: Tensor, size: Tensor | None) -> Tensor:
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    bias = _log_size(size, q.dtype)
    return (logits if bias is None else logits + bias).softmax(dim=-1)
