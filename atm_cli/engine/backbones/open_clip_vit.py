"""open_clip's VisionTransformer (a CLIP model's `visual` tower, or the whole CLIP model: its text tower
is left alone). The engine goes in at each residual block's forward; an 'avg' pool weighs tokens by size."""
from __future__ import annotations

from torch import Tensor, nn

from ..pooling import sized_mean
from .parts import AttentionParts, Backbone, BlockParts, Hook, MergingRun, Stem, fused_projection, linear_macs


def backbone(model: nn.Module) -> Backbone:
    name = type(model).__name__
    visual = getattr(model, "visual", model)
    if type(visual).__name__ != "VisionTransformer":
        raise ValueError(f"{name}: the image tower is a {type(visual).__name__}, not open_clip's VisionTransformer")
    if visual.attn_pool is not None:
        raise ValueError(f"{name}: an attentional pooler (CoCa) is not supported: its queries read every token")
    if visual.pool_type not in ("tok", "avg"):
        raise ValueError(f"{name}: pool_type={visual.pool_type!r} is not supported (needs 'tok' or 'avg')")
    transformer = visual.transformer
    if not transformer.batch_first:
        raise ValueError(f"{name}: a sequence-first transformer (batch_first=False) is not supported")
    for i, block in enumerate(transformer.resblocks):
        if type(block).__name__ != "ResidualAttentionBlock" or hasattr(block, "ln_1_kv"):
            raise ValueError(f"{name}: block {i} is a {type(block).__name__}, not the ResidualAttentionBlock the "
                             "engine merges in")
    width = visual.conv1.out_channels
    grid = visual.grid_size
    return Backbone(
        name=name,
        blocks=[_block_parts(block) for block in transformer.resblocks],
        num_prefix_tokens=1,
        has_class_token=True,
        width=width,
        stem=Stem(visual.conv1, visual.conv1.in_channels, tuple(visual.image_size), grid[0] * grid[1]),
        head_macs=0 if visual.proj is None else visual.proj.numel(),
        head_reads_prefix_only=visual.pool_type == "tok" and not visual.output_tokens,
        hooks=lambda run: _hooks(visual, run),
    )


def _block_parts(block: nn.Module) -> BlockParts:
    attn: nn.MultiheadAttention = block.attn
    head_dim = attn.embed_dim // attn.num_heads
    parts = AttentionParts(num_heads=attn.num_heads, head_dim=head_dim, scale=head_dim ** -0.5,
                           project=fused_projection(attn.in_proj_weight, attn.in_proj_bias, attn.num_heads, head_dim),
                           proj=attn.out_proj, linear_macs=4 * attn.embed_dim ** 2)
    return BlockParts(norm1=block.ln_1, attn=parts, norm2=block.ln_2, mlp=block.mlp, mlp_macs=linear_macs(block.mlp),
                      after_attention=(block.ls_1,), after_mlp=(block.ls_2,))


def _hooks(visual: nn.Module, run: MergingRun) -> list[Hook]:
    hooks: list[Hook] = [(block, "forward", _block_forward(run, index))
                         for index, block in enumerate(visual.transformer.resblocks)]
    if visual.pool_type == "avg":
        hooks.append((visual, "_global_pool", _sized_global_pool(run)))
    return hooks


def _block_forward(run: MergingRun, index: int):
    def forward(q_x: Tensor, k_x: Tensor | None = None, v_x: Tensor | None = None,
                attn_mask: Tensor | None = None) -> Tensor:
        if attn_mask is not None or k_x is not None or v_x is not None:
            raise ValueError("token merging needs self-attention without masks: the tokens they address are merged away")
        return run.block(index, q_x)

    return forward


def _sized_global_pool(run: MergingRun):
    def global_pool(x: Tensor) -> tuple[Tensor, Tensor]:
        sizes = run.sizes()
        tokens = x[:, 1:]
        return (tokens.mean(dim=1) if sizes is None else sized_mean(tokens, sizes[:, 1:])), tokens

    return global_pool
