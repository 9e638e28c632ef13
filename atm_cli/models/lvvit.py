"""LV-ViT (Jiang et al., 2021, "All Tokens Matter: Token Labeling for Training Better Vision Transformers").

Written from the paper as a timm `VisionTransformer`, so the engine patches it like any other ViT:
- the stem is three convolutions (7x7 stride 2, 3x3, 3x3, each with BatchNorm and ReLU) before the
  patch projection, which then cuts the half-resolution map into 8x8 patches (still 14x14 tokens);
- every residual branch is divided by a constant (`skip_lam`), expressed through timm Block's
  `ls1`/`ls2` hooks with no parameter, so timm's `Block` and `Attention` stay in place;
- the token-labeling head: at inference the logits are the class token's head plus 0.5 x the
  auxiliary head's maximum over the image tokens (over the tokens left after merging, when merged).
Parameter names are the authors' (`patch_embed.conv1`, `aux_head`, ...): their released files load
as they are, e.g. `timm.create_model("lvvit_s", checkpoint_path="lvvit_s-26M-224-83.3.pth.tar")`.
"""
from __future__ import annotations

from torch import Tensor, nn
from timm.layers import PatchEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from .checkpoints import unwrap_checkpoint

RELEASES = "https://github.com/zihangJiang/TokenLabeling/releases/download"


class ConvStemPatchEmbed(PatchEmbed):
    """LV-ViT's patch embedding: a 3-convolution stem at half resolution, then a (patch_size / 2) projection."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 stem_width: int = 64, **kwargs) -> None:
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **kwargs)
        dd = {key: kwargs[key] for key in ("device", "dtype") if key in kwargs}
        self.conv1 = nn.Conv2d(in_chans, stem_width, kernel_size=7, stride=2, padding=3, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(stem_width, **dd)
        self.conv2 = nn.Conv2d(stem_width, stem_width, kernel_size=3, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(stem_width, **dd)
        self.conv3 = nn.Conv2d(stem_width, stem_width, kernel_size=3, padding=1, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(stem_width, **dd)
        self.relu = nn.ReLU(inplace=True)
        # The projection reads the stem's half-resolution map, not the image: it replaces PatchEmbed's.
        half_patch = self.patch_size[0] // 2
        self.proj = nn.Conv2d(stem_width, embed_dim, kernel_size=half_patch, stride=half_patch, **dd)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class ResidualScale(nn.Module):
    """Divides a residual branch by a constant (LV-ViT's `skip_lam`); nothing to load."""

    def __init__(self, divisor: float) -> None:
        super().__init__()
        self.divisor = divisor

    def forward(self, x: Tensor) -> Tensor:
        return x / self.divisor

    def extra_repr(self) -> str:
        return f"divisor={self.divisor}"


class LVViT(VisionTransformer):
    """A timm ViT with LV-ViT's stem, residual scaling and token-labeling head (`aux_head`)."""

    def __init__(self, skip_lam: float = 1.0, **kwargs) -> None:
        super().__init__(**{"embed_layer": ConvStemPatchEmbed, "qkv_bias": False, "mlp_ratio": 3.0,
                            "norm_layer": nn.LayerNorm, **kwargs})
        self.aux_head = self._new_head(self.num_classes)
        if skip_lam != 1.0:
            for block in self.blocks:
                block.ls1, block.ls2 = ResidualScale(skip_lam), ResidualScale(skip_lam)

    def _new_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        self.aux_head = self._new_head(num_classes)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        logits = super().forward_head(x, pre_logits)
        if pre_logits or self.num_classes == 0:
            return logits
        return logits + 0.5 * self.aux_head(x[:, self.num_prefix_tokens:]).amax(dim=1)


# (embed_dim, depth, num_heads, skip_lam) from the paper's Table 1 and the authors' released models.
ARCHS = {
    "lvvit_t": dict(embed_dim=240, depth=12, num_heads=4, skip_lam=1.0),
    "lvvit_s": dict(embed_dim=384, depth=16, num_heads=6, skip_lam=2.0),
    "lvvit_m": dict(embed_dim=512, depth=20, num_heads=8, skip_lam=2.0),
}

default_cfgs = generate_default_cfgs({
    "lvvit_t.in1k": dict(url=f"{RELEASES}/v0.2.0/lvvit_t.pth", crop_pct=0.9, interpolation="bicubic"),
    "lvvit_s.in1k": dict(url=f"{RELEASES}/1.0/lvvit_s-26M-224-83.3.pth.tar", crop_pct=0.9, interpolation="bicubic"),
    "lvvit_m.in1k": dict(url=f"{RELEASES}/1.0/lvvit_m-56M-224-84.0.pth.tar", crop_pct=1.0, interpolation="bicubic"),
})


def _create(variant: str, pretrained: bool, **kwargs) -> LVViT:
    return build_model_with_cfg(LVViT, variant, pretrained, pretrained_filter_fn=unwrap_checkpoint,
                                **{**ARCHS[variant], **kwargs})


@register_model
def lvvit_t(pretrained: bool = False, **kwargs) -> LVViT:
    """LV-ViT-T: 12 blocks of width 240, 8.5M parameters, 79.1% top-1 (ImageNet-1k, 224)."""
    return _create("lvvit_t", pretrained, **kwargs)


@register_model
def lvvit_s(pretrained: bool = False, **kwargs) -> LVViT:
    """LV-ViT-S: 16 blocks of width 384, 26.2M parameters, 83.3% top-1."""
    return _create("lvvit_s", pretrained, **kwargs)


@register_model
def lvvit_m(pretrained: bool = False, **kwargs) -> LVViT:
    """LV-ViT-M: 20 blocks of width 512, 55.8M parameters, 84.0% top-1."""
    return _create("lvvit_m", pretrained, **kwargs)
