"""Fixtures shared by the test suite: tiny timm ViTs saved to disk and tiny image folders."""
from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models import save_for_hf

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
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


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    """A 3-class tiny ViT folder."""
    return save_tiny_vit(tmp_path_factory.mktemp("tiny-vit"), num_classes=3)


@pytest.fixture(scope="session")
def tiny_imagenet_vit_dir(tmp_path_factory) -> Path:
    """A tiny ViT with ImageNet-1k's 1,000 outputs (timm then knows its classes' WordNet ids)."""
    return save_tiny_vit(tmp_path_factory.mktemp("tiny-vit-in1k"), num_classes=1000)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Three classes a, b, c with 5, 4 and 3 random images."""
    return write_image_folder(tmp_path / "images", {"a": 5, "b": 4, "c": 3})


@pytest.fixture(scope="session")
def demo():
    """The embedded default model on the CPU, loaded once for the whole session (tests must not patch it
    without unpatching: use `atm_cli.engine.merging`)."""
    from atm_cli.evaluation import load_model
    from atm_cli.models import DEMO_WEIGHTS

    if not DEMO_WEIGHTS.is_file():
        pytest.skip(f"the embedded model's weights are not bundled ({DEMO_WEIGHTS})")
    return load_model(device="cpu")


@pytest.fixture(scope="session")
def imagenet_sample(tmp_path_factory) -> Path:
    """The shared 1,300-image ImageNet validation sample (725 classes), unpacked once."""
    archive = SHARED_DATA / "imagenet-val-sample.tar.gz"
    if not archive.is_file():
        pytest.skip(f"shared data absent: {archive}")
    target = tmp_path_factory.mktemp("imagenet")
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    return target / "imagenet-val-sample"


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run only where a GPU is present; elsewhere they are skipped with the reason."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU here (benchmarks/gpu_check.sh runs these on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
