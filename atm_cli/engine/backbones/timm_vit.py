"""timm's VisionTransformer (and the families built on it: DeiT, LV-ViT, T2T-ViT, MAE, SigLIP towers)."""
from __future__ import annotations

import types

from torch import Tensor
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from ..pooling import check_pool_supported, pool_with_sizes
from .parts import AttentionParts, Backbone, BlockParts, Hook, MergingRun, Stem, fused_projection, linear_macs


def backbone(model: VisionTransformer) -> Backbone:
    name = type(model).__name__
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{name} is not a timm VisionTransformer: the engine needs its patch_embed, blocks and prefix tokens")
    for i, block in enumerate(model.blocks):
        if type(block).forward is not Block.forward:
            raise ValueError(f"{name}: block {i} is a {type(block).__name__}, not timm's pre-norm Block the engine patches")
        if type(block.attn).forward is not Attention.forward:
            raise ValueError(f"{name}: block {i} attention is {type(block.attn).__name__} (e.g. RoPE), not timm's Attention")
    check_pool_supported(model)
    heads = [getattr(model, name, None) for name in ("head", "head_dist", "aux_head")]
    head_macs = [linear_macs(h) if h is not None else 0 for h in heads]
    pool = model.attn_pool
    pool_macs = pool_token_macs = 0
    if pool is not None:  # timm's AttentionPoolLatent (checked): keys and values per token, the rest once
        pool_token_macs = linear_macs(pool.kv) + 2 * pool.num_heads * pool.head_dim * pool.latent_len
        pool_macs = linear_macs(pool) - linear_macs(pool.kv)
    stem = model.patch_embed
    if getattr(stem, "img_size", None) is None:
        raise ValueError(f"{name}: patch_embed has no img_size to count the stem's cost at")
    return Backbone(
        name=name,
        blocks=[_block_parts(block) for block in model.blocks],
        num_prefix_tokens=model.num_prefix_tokens,
        has_class_token=model.cls_token is not None,
        width=model.embed_dim,
        stem=Stem(stem, model.in_chans, tuple(stem.img_size), stem.num_patches),
        head_macs=head_macs[0] + head_macs[1] + pool_macs,
        token_head_macs=head_macs[2] + pool_token_macs,
        head_reads_prefix_only=model.global_pool == "token" and heads[2] is None,
        hooks=lambda run: _hooks(model, run),
    )


def attention_parts(attn: Attention) -> AttentionParts:
    return AttentionParts(
        num_heads=attn.num_heads, head_dim=attn.head_dim, scale=attn.scale,
        project=fused_projection(attn.qkv.weight, attn.qkv.bias, attn.num_heads, attn.head_dim),
        proj=attn.proj, linear_macs=linear_macs(attn), fused=attn.fused_attn,
        q_norm=attn.q_norm, k_norm=attn.k_norm, out_norm=attn.norm, gate=getattr(attn, "gate", None),
        attn_drop=attn.attn_drop, proj_drop=attn.proj_drop,
    )


def _block_parts(block: Block) -> BlockParts:
    return BlockParts(norm1=block.norm1, attn=attention_parts(block.attn), norm2=block.norm2, mlp=block.mlp,
                      mlp_macs=linear_macs(block.mlp), after_attention=(block.ls1, block.drop_path1),
                      after_mlp=(block.ls2, block.drop_path2))


def _hooks(model: VisionTransformer, run: MergingRun) -> list[Hook]:
    def forward_features(self, images: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("token merging does not support attention masks: the tokens they address are merged away")
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(images))))
        return self.norm(run.blocks(x))

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        return pool_with_sizes(self, x, run.sizes(), pool_type)

    hooks: list[Hook] = [(model, "forward_features", types.MethodType(forward_features, model))]
    if model.global_pool in ("avg", "map"):
        hooks.append((model, "pool", types.MethodType(pool, model)))
    return hooks
