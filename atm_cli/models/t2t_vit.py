"""T2T-ViT_t (Yuan et al., 2021, "Tokens-to-Token ViT: Training Vision Transformers from Scratch on ImageNet").

Written from the paper as a timm `VisionTransformer` whose patch embedding is the Tokens-to-Token
module: soft splits (overlapping unfolds, 7x7 stride 4, then 3x3 stride 2 twice) with a small
transformer layer between them, then a linear projection to 14x14 tokens. The `_t` variants use
full attention in those layers. The backbone is a plain pre-norm ViT with a fixed sinusoidal
position code, so the engine patches its blocks; the T2T module is part of the stem and never merges.
Parameter names are the authors' (`tokens_to_token.attention1...`): their released `.pth.tar`
files (weights under `state_dict_ema`) load as they are.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import Mlp, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from .checkpoints import unwrap_checkpoint

RELEASES = "https://github.com/yitu-opensource/T2T-ViT/releases/download/main"


class TokenAttention(nn.Module):
    """Single-head attention that maps `dim` features to `out_dim`; its values carry the residual."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.scale = dim ** -0.5  # the input width, as the authors scale it (one head)
        self.qkv = nn.Linear(dim, 3 * out_dim, bias=False)
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).split(self.out_dim, dim=-1)
        return v + self.proj(F.scaled_dot_product_attention(q, k, v, scale=self.scale))


class TokenTransformer(nn.Module):
    """One T2T layer: norm, token attention (with the residual through its values), norm, MLP with residual."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenAttention(dim, out_dim)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = Mlp(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokensToToken(nn.Module):
    """The T2T module as a patch embedding: images (B, 3, H, W) to tokens (B, H/16 * W/16, embed_dim)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 token_dim: int = 64, **_: object) -> None:  # timm's other PatchEmbed arguments do not apply
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.soft_split0 = nn.Unfold(kernel_size=7, stride=4, padding=2)
        self.soft_split1 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        self.soft_split2 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        self.attention1 = TokenTransformer(in_chans * 7 * 7, token_dim)
        self.attention2 = TokenTransformer(token_dim * 3 * 3, token_dim)
        self.project = nn.Linear(token_dim * 3 * 3, embed_dim)

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        return self.patch_size[0] if as_scalar else self.patch_size

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        x = self.attention1(self.soft_split0(x).transpose(1, 2))
        height, width = (height - 3) // 4 + 1, (width - 3) // 4 + 1  # soft_split0's output grid
        x = self.attention2(self.soft_split1(_as_map(x, height, width)).transpose(1, 2))
        height, width = (height - 1) // 2 + 1, (width - 1) // 2 + 1  # soft_split1's
        return self.project(self.soft_split2(_as_map(x, height, width)).transpose(1, 2))


def _as_map(tokens: Tensor, height: int, width: int) -> Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


def sinusoid_position_code(n_positions: int, dim: int) -> Tensor:
    """The Transformer's fixed position code (Vaswani et al., 2017): sin on even channels, cos on odd, (1, N, dim)."""
    channel = torch.arange(dim)
    angle = torch.arange(n_positions, dtype=torch.float64)[:, None] / 10000.0 ** (2 * (channel // 2) / dim)
    return torch.where(channel % 2 == 0, angle.sin(), angle.cos()).float()[None]


class T2TViT(VisionTransformer):
    """A timm ViT whose `patch_embed` is the T2T module, stored under the authors' name `tokens_to_token`."""

    def __init__(self, token_dim: int = 64, **kwargs) -> None:
        super().__init__(**{"embed_layer": partial(TokensToToken, token_dim=token_dim), "qkv_bias": False,
                            "mlp_ratio": 3.0, "norm_layer": nn.LayerNorm, **kwargs})
        self.tokens_to_token = self._modules.pop("patch_embed")
        if self.pos_embed is not None:  # fixed, not learnt (but saved in the authors' files)
            self.pos_embed.requires_grad_(False)
            with torch.no_grad():
                self.pos_embed.copy_(sinusoid_position_code(self.pos_embed.shape[1], self.embed_dim))

    @property
    def patch_embed(self) -> nn.Module:
        # timm's code and the engine read `patch_embed`; the authors' checkpoints name it tokens_to_token.
        # While VisionTransformer.__init__ runs, the module is still registered as patch_embed.
        modules = self._modules
        return modules["tokens_to_token"] if "tokens_to_token" in modules else modules["patch_embed"]


# (embed_dim, depth, num_heads) from the paper's Table 1 (T2T-ViT_t: transformer layers in the T2T module).
ARCHS = {
    "t2t_vit_t_14": dict(embed_dim=384, depth=14, num_heads=6),
    "t2t_vit_t_19": dict(embed_dim=448, depth=19, num_heads=7),
    "t2t_vit_t_24": dict(embed_dim=512, depth=24, num_heads=8),
}

default_cfgs = generate_default_cfgs({
    "t2t_vit_t_14.in1k": dict(url=f"{RELEASES}/81.7_T2T_ViTt_14.pth.tar", crop_pct=0.9, interpolation="bicubic"),
    "t2t_vit_t_19.in1k": dict(url=f"{RELEASES}/82.4_T2T_ViTt_19.pth.tar", crop_pct=0.9, interpolation="bicubic"),
    "t2t_vit_t_24.in1k": dict(url=f"{RELEASES}/82.6_T2T_ViTt_24.pth.tar", crop_pct=0.9, interpolation="bicubic"),
})


def _create(variant: str, pretrained: bool, **kwargs) -> T2TViT:
    return build_model_with_cfg(T2TViT, variant, pretrained, pretrained_filter_fn=unwrap_checkpoint,
                                **{**ARCHS[variant], **kwargs})


@register_model
def t2t_vit_t_14(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT_t-14: 14 blocks of width 384, 21.5M parameters, 81.7% top-1 (ImageNet-1k, 224)."""
    return _create("t2t_vit_t_14", pretrained, **kwargs)


@register_model
def t2t_vit_t_19(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT_t-19: 19 blocks of width 448, 39.2M parameters, 82.4% top-1."""
    return _create("t2t_vit_t_19", pretrained, **kwargs)


@register_model
def t2t_vit_t_24(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT_t-24: 24 blocks of width 512, 64.1M parameters, 82.6% top-1."""
    return _create("t2t_vit_t_24", pretrained, **kwargs)
