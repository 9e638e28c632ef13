"""GFLOPs per image from the token counts of one forward pass (the contract's convention: 1 MAC = 1 FLOP)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from timm.layers import AttentionPoolLatent


@dataclass(frozen=True)
class BlockStep:
    """Token counts of one block: entering it and after its reduction step, and that step's own work."""

    tokens_in: int
    tokens_after_merge: int
    step_macs: int = 0  # per image: e.g. the similarity product |a| * |b| * head_dim


def _linear_macs(module: nn.Module) -> int:
    """Multiply-adds per token of every Linear inside `module` (qkv + proj, or fc1 + fc2)."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _stem_macs_per_patch(model: nn.Module) -> int:
    """Multiply-adds per patch of `model.patch_embed` (a patch projection, a conv or ResNet stem, a T2T module).

    torch's FLOP counter runs the stem once at the model's input size on meta tensors: shapes only, so
    it costs no arithmetic and works for any stem. It counts convolutions and matrix products (2 FLOPs
    per multiply-add), not norms or activations, as the contract's patch-projection count does.
    """
    stem = model.patch_embed
    if getattr(stem, "img_size", None) is None:
        raise ValueError(f"{type(model).__name__}: patch_embed has no img_size to count the stem's cost at")
    height, width = stem.img_size
    dtype = next(stem.parameters(), torch.empty(0)).dtype  # a half-precision stem takes half-precision images
    images = torch.empty(1, model.in_chans, height, width, device="meta", dtype=dtype)
    tensors = {name: torch.empty_like(t, device="meta")
               for name, t in [*stem.named_parameters(), *stem.named_buffers()]}
    with FlopCounterMode(display=False) as counter:
        tokens = torch.func.functional_call(stem, tensors, (images,))
    return counter.get_total_flops() // (2 * math.prod(tokens.shape[1:-1]))


@dataclass(frozen=True)
class Geometry:
    """The shapes that the FLOP count needs, read once from the model when it is patched."""

    width: int
    num_prefix: int
    patch_macs: int  # the stem's, per patch (width * in_chans * patch_h * patch_w for a plain projection)
    attn_linear_macs: tuple[int, ...]  # per token, per block
    attn_widths: tuple[int, ...]
    mlp_macs: tuple[int, ...]
    head_macs: int
    # Per image token left after the blocks, of what reads each one: LV-ViT's aux_head, the keys and
    # values of an attention pool (SigLIP) with its two attention products.
    token_head_macs: int = 0

    @classmethod
    def of(cls, model: nn.Module) -> "Geometry":
        heads = [getattr(model, name, None) for name in ("head", "head_dist", "aux_head")]
        head_macs = [h.in_features * h.out_features if isinstance(h, nn.Linear) else 0 for h in heads]
        pool = getattr(model, "attn_pool", None)
        pool_macs, pool_token_macs = 0, 0
        if isinstance(pool, AttentionPoolLatent):
            pool_token_macs = _linear_macs(pool.kv) + 2 * pool.num_heads * pool.head_dim * pool.latent_len
            pool_macs = _linear_macs(pool) - _linear_macs(pool.kv)  # the latent query, proj and MLP, once
        return cls(
            width=model.embed_dim,
            num_prefix=model.num_prefix_tokens,
            patch_macs=_stem_macs_per_patch(model),
            attn_linear_macs=tuple(_linear_macs(b.attn) for b in model.blocks),
            attn_widths=tuple(b.attn.num_heads * b.attn.head_dim for b in model.blocks),
            mlp_macs=tuple(_linear_macs(b.mlp) for b in model.blocks),
            head_macs=head_macs[0] + head_macs[1] + pool_macs,
            token_head_macs=head_macs[2] + pool_token_macs,
        )

    def gflops(self, steps: list[BlockStep], final_tokens: int) -> float:
        """The stem, every block as the contract counts it, the final norm and the head(s)."""
        d = self.width
        flops = (steps[0].tokens_in - self.num_prefix) * self.patch_macs
        for i, step in enumerate(steps):
            n, n_merged = step.tokens_in, step.tokens_after_merge
            flops += 5 * n * d + n * self.attn_linear_macs[i] + 2 * n * n * self.attn_widths[i]  # norm1, attention
            flops += step.step_macs  # the reduction step's own work
            flops += 5 * n_merged * d + n_merged * self.mlp_macs[i]  # norm2, MLP
        flops += 5 * final_tokens * d + self.head_macs  # final norm, head(s)
        flops += (final_tokens - self.num_prefix) * self.token_head_macs
        return flops / 1e9
