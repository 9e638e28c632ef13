"""Fine-tuned MAE classifiers (He et al., 2022, "Masked Autoencoders Are Scalable Vision Learners").

MAE's fine-tuned models are timm ViTs that classify from the mean of the image tokens through a
LayerNorm (`global_pool='avg'`, `fc_norm`) instead of the class token. timm names only MAE's
pretraining weights (`vit_base_patch16_224.mae`, no classifier), so these names build the
fine-tuning architecture and load the authors' fine-tuned files (weights under `model`), e.g.
`atm eval --model vit_base_patch16_224_mae_ft --checkpoint mae_finetuned_vit_base.pth`.
The paper runs ATM on them without proportional attention (its App. A); the presets say so.
"""
from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from .checkpoints import unwrap_checkpoint

RELEASES = "https://dl.fbaipublicfiles.com/mae/finetune"

ARCHS = {
    "vit_base_patch16_224_mae_ft": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224_mae_ft": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14_224_mae_ft": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}

# MAE evaluates at 224 after resizing to 256 (crop 0.875), bicubic, ImageNet mean and std.
default_cfgs = generate_default_cfgs({
    f"{name}.in1k": dict(url=f"{RELEASES}/mae_finetuned_vit_{size}.pth", crop_pct=0.875, interpolation="bicubic")
    for name, size in zip(ARCHS, ("base", "large", "huge"))
})


def _create(variant: str, pretrained: bool, **kwargs) -> VisionTransformer:
    return build_model_with_cfg(VisionTransformer, variant, pretrained, pretrained_filter_fn=unwrap_checkpoint,
                                **{**ARCHS[variant], "global_pool": "avg", "fc_norm": True, **kwargs})


@register_model
def vit_base_patch16_224_mae_ft(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """MAE ViT-B/16 fine-tuned on ImageNet-1k: 86.6M parameters, 83.6% top-1."""
    return _create("vit_base_patch16_224_mae_ft", pretrained, **kwargs)


@register_model
def vit_large_patch16_224_mae_ft(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """MAE ViT-L/16 fine-tuned on ImageNet-1k: 85.9% top-1."""
    return _create("vit_large_patch16_224_mae_ft", pretrained, **kwargs)


@register_model
def vit_huge_patch14_224_mae_ft(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """MAE ViT-H/14 fine-tuned on ImageNet-1k: 86.9% top-1."""
    return _create("vit_huge_patch14_224_mae_ft", pretrained, **kwargs)
