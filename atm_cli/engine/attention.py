"""timm's Attention forward, with proportional attention and the merging metric (the keys)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from timm.layers import Attention


def attention_with_sizes(attn: Attention, x: Tensor, size: Tensor | None, with_probabilities: bool = False,
                         per_head: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """Return the attention output, the keys averaged over heads (B, N, head_dim), and, when asked, the
    attention probabilities averaged over heads (B, N, N), which methods such as EViT score tokens by,
    or with `per_head` each head's own (B, H, N, N), which Zero-TPrune ranks tokens by.

    With `size`, each key's logit gets + log(size) (the paper's proportional attention, App. A):
    an additive float mask for `scaled_dot_product_attention`, so the fused kernel stays in use
    unless the probabilities are wanted.
    """
    batch, n_tokens, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(batch, n_tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None if size is None else size.log().to(q.dtype).reshape(batch, 1, 1, n_tokens)

    probabilities = None
    if attn.fused_attn and not with_probabilities:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        weights = logits.softmax(dim=-1)
        probabilities = (weights if per_head else weights.mean(dim=1)) if with_probabilities else None
        out = attn.attn_drop(weights) @ v

    out = attn.norm(out.transpose(1, 2).reshape(batch, n_tokens, -1))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), k.mean(dim=1), probabilities
