"""GFLOPs per image from the token counts of one forward pass (the contract's convention: 1 MAC = 1 FLOP)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class BlockStep:
    """Token counts of one block: entering it and after its reduction step, and that step's own work."""

    tokens_in: int
    tokens_after_merge: int
    step_macs: int = 0  # per image: e.g. the similarity product |a| * |b| * head_dim


def _linear_macs(module: nn.Module) -> int:
    """Multiply-adds per token of every Linear inside `module` (qkv + proj, or fc1 + fc2)."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


@dataclass(frozen=True)
class Geometry:
    """The shapes that the FLOP count needs, read once from the model when it is patched."""

    width: int
    num_prefix: int
    patch_macs: int  # per patch: width * in_chans * patch_h * patch_w
    attn_linear_macs: tuple[int, ...]  # per token, per block
    attn_widths: tuple[int, ...]
    mlp_macs: tuple[int, ...]
    head_macs: int

    @classmethod
    def of(cls, model: nn.Module) -> "Geometry":
        heads = [getattr(model, name, None) for name in ("head", "head_dist")]
        return cls(
            width=model.embed_dim,
            num_prefix=model.num_prefix_tokens,
            patch_macs=model.patch_embed.proj.weight.numel(),
            attn_linear_macs=tuple(_linear_macs(b.attn) for b in model.blocks),
            attn_widths=tuple(b.attn.num_heads * b.attn.head_dim for b in model.blocks),
            mlp_macs=tuple(_linear_macs(b.mlp) for b in model.blocks),
            head_macs=sum(h.in_features * h.out_features for h in heads if isinstance(h, nn.Linear)),
        )

    def gflops(self, steps: list[BlockStep], final_tokens: int) -> float:
        """Patch embedding, every block as the contract counts it, the final norm and the head(s)."""
        d = self.width
        flops = (steps[0].tokens_in - self.num_prefix) * self.patch_macs
        for i, step in enumerate(steps):
            n, n_merged = step.tokens_in, step.tokens_after_merge
            flops += 5 * n * d + n * self.attn_linear_macs[i] + 2 * n * n * self.attn_widths[i]  # norm1, attention
            flops += step.step_macs  # the reduction step's own work
            flops += 5 * n_merged * d + n_merged * self.mlp_macs[i]  # norm2, MLP
        flops += 5 * final_tokens * d + self.head_macs  # final norm, head(s)
        return flops / 1e9
