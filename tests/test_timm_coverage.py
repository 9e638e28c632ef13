"""Every timm VisionTransformer with pretrained weights either patches or is refused with a ValueError that
names the part the engine does not handle (built on the meta device: shapes only, a few seconds for all)."""
from __future__ import annotations

import sys

import timm
import torch
from timm.layers import Attention
from timm.models import get_arch_name, model_entrypoint
from timm.models.vision_transformer import Block, VisionTransformer

from atm_cli.engine import ToMeConfig, patch
from atm_cli.engine.pooling import SUPPORTED_POOLS


def pretrained_vision_transformers() -> list[str]:
    """timm's architectures with pretrained weights from modules that build VisionTransformer (or a subclass);
    atm's own (LV-ViT, T2T-ViT, MAE, the demo model) too once `atm_cli.models` is imported."""
    def builds_vit(arch: str) -> bool:
        module = sys.modules[model_entrypoint(arch).__module__]
        return any(isinstance(v, type) and issubclass(v, VisionTransformer) for v in vars(module).values())
    return sorted(arch for arch in {get_arch_name(n) for n in timm.list_models(pretrained=True)} if builds_vit(arch))


def test_every_pretrained_timm_vision_transformer_patches_or_names_what_is_missing():
    patched, refused = [], []
    for arch in pretrained_vision_transformers():
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, weight_init="skip")
        if not isinstance(model, VisionTransformer):
            continue
        # What the engine needs, read independently of it: timm's Block and Attention, a pool it reproduces.
        parts = [(b, getattr(b, "attn", None)) for b in model.blocks]
        supported = (all(type(b).forward is Block.forward and type(a).forward is Attention.forward for b, a in parts)
                     and model.global_pool in SUPPORTED_POOLS)
        try:
            patch(model, ToMeConfig(r=0))
            patched.append(arch)
        except ValueError as error:
            refused.append(arch)
            assert type(model).__name__ in str(error) and not supported, (arch, str(error))
            names = {type(part).__name__ for pair in parts for part in pair} | {repr(model.global_pool)}
            assert any(name in str(error) for name in names - {"Block", "Attention"}), (arch, str(error))
        else:
            assert supported, arch
    assert len(patched) >= 170 and len(patched) + len(refused) >= 180  # timm 1.0.31: 178 of 183
