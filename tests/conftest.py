"""Fixtures shared by the test suite: tiny timm ViTs saved to disk and tiny image folders."""
from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import timm
import torch
from timm.models import save_for_hf

from helpers import CALIBRATE_VIT_ARGS, save_tiny_vit, write_flat_images, write_image_folder

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    """A 3-class tiny ViT folder."""
    return save_tiny_vit(tmp_path_factory.mktemp("tiny-vit"), num_classes=3)


@pytest.fixture(scope="session")
def tiny_imagenet_vit_dir(tmp_path_factory) -> Path:
    """A tiny ViT with ImageNet-1k's 1,000 outputs (timm then knows its classes' WordNet ids)."""
    return save_tiny_vit(tmp_path_factory.mktemp("tiny-vit-in1k"), num_classes=1000)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """test_calibrate's model and images (see CALIBRATE_VIT_ARGS); test_evaluation's own `tiny` is another."""
    root = tmp_path_factory.mktemp("calibrate")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **CALIBRATE_VIT_ARGS).eval()
    save_for_hf(model, str(root / "model"), model_args=CALIBRATE_VIT_ARGS, safe_serialization=True)
    return {"model": root / "model", "data": write_flat_images(root / "tune", 12, seed=1),
            "eval": write_flat_images(root / "held-out", 8, seed=2)}


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
