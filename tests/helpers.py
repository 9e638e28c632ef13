"""Helpers shared by several test modules: tiny models and image folders, engine checks, a preset, CLI args."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config
from timm.models import save_for_hf
from torch.utils.flop_counter import FlopCounterMode

from atm_cli.engine import ATMConfig, Trace, last_trace, merging, patch
from atm_cli.evaluation import LoadedModel
from atm_cli.evaluation.latency import LatencyKey, LatencyModel, StepCost, TokenTable, token_grid
from atm_cli.presets import Measured, ModelInfo, build_preset

# --- models and images ----------------------------------------------------------------------------------------------

# A ViT small enough to run in milliseconds: 32x32 images, 4x4 = 16 patches, 2 blocks.
TINY_VIT_ARGS = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)


def make_tiny_vit(num_classes: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **TINY_VIT_ARGS).eval()


def save_tiny_vit(folder: Path, num_classes: int, seed: int = 0) -> Path:
    """A model folder in timm's own format (config.json + model.safetensors), loadable as `--model FOLDER`."""
    save_for_hf(make_tiny_vit(num_classes, seed), str(folder), model_args={**TINY_VIT_ARGS, "num_classes": num_classes},
                safe_serialization=True)
    return folder


def write_image_folder(root: Path, counts: dict[str, int], size: tuple[int, int] = (40, 36), seed: int = 0) -> Path:
    """root/<class>/<i>.jpg with random pixels; `counts` gives each class's number of images."""
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.jpg", quality=90)
    return root


# A ViT small enough for seconds, with 64 patches so that merging has room, and images with flat
# regions (many patches alike, as sky or background), so that merging happens at ATM's thresholds.
CALIBRATE_VIT_ARGS = dict(img_size=32, patch_size=4, depth=4, embed_dim=32, num_heads=2, num_classes=3)
WIDE_RANGES = ["--alpha-range", "0.5,1.0", "--beta-range", "0.0,0.2", "--theta-min-range", "0.3,1.0", "--step", "0.01"]


def write_flat_images(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for name in "abc":
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.zeros((32, 32, 3), np.uint8) + rng.integers(0, 256, 3, dtype=np.uint8)
            for _ in range(rng.integers(1, 5)):
                y, x = rng.integers(0, 28, 2)
                h, w = rng.integers(4, 16, 2)
                pixels[y:y + h, x:x + w] = rng.integers(0, 256, 3)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


def calibrate_args(tiny, *extra: str) -> list[str]:
    return ["calibrate", "--model", str(tiny["model"]), "--data", str(tiny["data"]), "--batch-size", "8",
            *WIDE_RANGES, *extra]


def direct_tensors(root: Path, model: torch.nn.Module, classes: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image under root, class folders and files in sorted order, through timm's eval transform."""
    transform = create_transform(**resolve_model_data_config(model), is_training=False)
    images, labels = [], []
    for name in sorted(classes):
        for path in sorted((root / name).iterdir()):
            images.append(transform(Image.open(path).convert("RGB")))
            labels.append(classes[name])
    return torch.stack(images), torch.tensor(labels)


def non_blank(path) -> bool:
    pixels = np.asarray(Image.open(path).convert("RGB"))
    return pixels.shape[0] > 100 and pixels.shape[1] > 100 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10


def hand_built_latency(loaded: LoadedModel, images, fits, folder=None, progress=None) -> LatencyModel:
    """In place of timing: linear tables over the model's own token counts, and no step cost."""
    grid = token_grid(2, loaded.unmerged_tokens[0])
    return LatencyModel(LatencyKey.of(loaded, len(images)), 0.01, 0.005,
                        TokenTable(grid, tuple(1e-3 * n for n in grid)), TokenTable(grid, tuple(2e-3 * n for n in grid)),
                        steps={name: StepCost(0.0, 0.0) for name in fits})


# --- the engine on random-weight models -----------------------------------------------------------------------------

NO_MERGE_ATM = ATMConfig(alpha=1.0, beta=0.0, theta_min=1.0)  # no cosine similarity exceeds 1: nothing merges
EAGER_ATM = ATMConfig(alpha=0.5, beta=0.0, theta_min=0.5)  # low thresholds: random-weight models merge too

# (timm name, constructor overrides): every family the engine must handle, all with random weights.
FAMILIES = {
    "deit_tiny": ("deit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "deit3_layerscale": ("deit3_small_patch16_224", {}),
    "registers": ("deit_tiny_patch16_224", {"reg_tokens": 4}),
    "qk_norm": ("deit_tiny_patch16_224", {"qk_norm": True}),
    "avg_pool_mae_style": ("deit_tiny_patch16_224", {"global_pool": "avg"}),
}


def build(family: str) -> torch.nn.Module:
    name, overrides = FAMILIES[family]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **overrides).eval()


def assert_no_op(model: torch.nn.Module, images: torch.Tensor, *configs) -> torch.Tensor:
    """Each config (one that reduces nothing) gives the unpatched model's logits within 1e-5; returns those."""
    reference = model(images)
    for config in configs:
        patch(model, config)
        torch.testing.assert_close(model(images), reference, atol=1e-5, rtol=0)
    return reference


@torch.no_grad()
def engine_and_counter_gflops(config, images) -> tuple[Trace, float]:
    """DeiT-S reducing by `config`: the engine's trace, and GFLOPs per image as torch's FLOP counter sees them."""
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    for block in model.blocks:  # the counter sees the two attention products only when they are unfused
        block.attn.fused_attn = False
    with merging(model, config), FlopCounterMode(display=False) as counter:
        model(images)
        trace = last_trace(model)
    return trace, counter.get_total_flops() / 2 / images.shape[0] / 1e9  # the counter counts 2 FLOPs per MAC


@torch.no_grad()
def tokens_left_along(knob, steps, images) -> list[int]:
    """Tokens leaving the last block of a random DeiT-T at each of a method's knob `steps`."""
    model = build("deit_tiny")
    left = []
    for step in steps:
        with merging(model, knob.config(step)):
            model(images)
            left.append(last_trace(model).tokens[-1])
    return left


# --- presets --------------------------------------------------------------------------------------------------------

def a_preset(model: str = "deit_small_patch16_224", method=ATMConfig(0.985, 0.045, 0.88)):
    return build_preset(method, ModelInfo(name=model, tag="fb_in1k", num_classes=1000, checkpoint_sha256="ab" * 32),
                        batch_size=64, measured=Measured(gflops=3.2345678901234567, top1=79.5, baseline_gflops=4.6,
                                                         baseline_top1=79.8, n_images=100),
                        trials=12, seed=3, target="gflops <= 3.3")
