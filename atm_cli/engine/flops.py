"""GFLOPs per image from the token counts of one forward pass (the contract's convention: 1 MAC = 1 FLOP)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .backbones.parts import Backbone, Stem


@dataclass(frozen=True)
class BlockStep:
    """Token counts of one block: entering it and after its reduction step, and that step's own work."""

    tokens_in: int
    tokens_after_merge: int
    step_macs: int = 0  # per image: e.g. the similarity product |a| * |b| * head_dim


def _stem_macs_per_patch(stem: Stem) -> int:
    """Multiply-adds per patch of the stem (a patch projection, a conv or ResNet stem, a T2T module).

    torch's FLOP counter runs the stem once at the model's input size on meta tensors: shapes only, so
    it costs no arithmetic and works for any stem. It counts convolutions and matrix products (2 FLOPs
    per multiply-add), not norms or activations, as the contract's patch-projection count does.
    """
    module = stem.module
    dtype = next(module.parameters(), torch.empty(0)).dtype  # a half-precision stem takes half-precision images
    images = torch.empty(1, stem.in_chans, *stem.image_size, device="meta", dtype=dtype)
    tensors = {name: torch.empty_like(t, device="meta")
               for name, t in [*module.named_parameters(), *module.named_buffers()]}
    with FlopCounterMode(display=False) as counter:
        torch.func.functional_call(module, tensors, (images,))
    return counter.get_total_flops() // (2 * stem.num_patches)


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
    def of(cls, backbone: Backbone) -> "Geometry":
        return cls(
            width=backbone.width,
            num_prefix=backbone.num_prefix_tokens,
            patch_macs=_stem_macs_per_patch(backbone.stem),
            attn_linear_macs=tuple(b.attn.linear_macs for b in backbone.blocks),
            attn_widths=tuple(b.attn.width for b in backbone.blocks),
            mlp_macs=tuple(b.mlp_macs for b in backbone.blocks),
            head_macs=backbone.head_macs,
            token_head_macs=backbone.token_head_macs,
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
