"""The commands on models from transformers (`hf:FOLDER`) and open_clip (`open_clip:ARCH`): classifiers'
logits and CLIP zero-shot classification over an image folder's classes, random weights, no downloads."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from atm_cli.cli.app import app

from helpers import write_image_folder

transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

CLASSES = ("a", "b", "c")
VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
              patch_size=8)
TINY_OPEN_CLIP = {"embed_dim": 32,
                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8,
                                 "mlp_ratio": 2.0},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
runner = CliRunner()


def write_preprocessor(folder: Path, mean: list[float]) -> None:
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"do_resize": True, "size": {"shortest_edge": 32}, "do_center_crop": True,
         "crop_size": {"height": 32, "width": 32}, "image_mean": mean, "image_std": [0.26, 0.26, 0.27], "resample": 3}))


@pytest.fixture(scope="module")
def hf_classifier(tmp_path_factory) -> Path:
    """A ViTForImageClassification saved as transformers saves it, its labels the image folders' names."""
    folder = tmp_path_factory.mktemp("hf-vit")
    torch.manual_seed(0)
    config = transformers.ViTConfig(**VISION, num_labels=3, id2label=dict(enumerate(CLASSES)),
                                    label2id={name: i for i, name in enumerate(CLASSES)},
                                    architectures=["ViTForImageClassification"])
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    write_preprocessor(folder, [0.5, 0.5, 0.5])
    return folder


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory) -> Path:
    """A CLIPModel folder with a word-level tokenizer that knows the prompts' words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("hf-clip")
    words = ["[UNK]", "[PAD]", "a", "photo", "of", "b", "c", "."]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]",
                                         pad_token="[PAD]").save_pretrained(folder)
    torch.manual_seed(0)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                vocab_size=len(words), max_position_embeddings=16, bos_token_id=0, eos_token_id=7, pad_token_id=1)
    config = transformers.CLIPConfig(vision_config=VISION, text_config=text, projection_dim=16,
                                     architectures=["CLIPModel"])
    transformers.CLIPModel(config).save_pretrained(folder)
    write_preprocessor(folder, [0.48, 0.46, 0.41])
    return folder


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory) -> str:
    """A small open_clip architecture, registered the way open_clip takes custom configs."""
    folder = tmp_path_factory.mktemp("open-clip-configs")
    (folder / "atm-tiny-clip.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(folder)
    return "open_clip:atm-tiny-clip"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data") / "images", {name: 3 for name in CLASSES})


def run(*args) -> tuple[dict | None, object]:
    result = runner.invoke(app, [*map(str, args)])
    data = json.loads(result.stdout) if result.exit_code == 0 and "--json" in args else None
    return data, result


def test_eval_on_a_transformers_classifier_folder(hf_classifier, images):
    report, result = run("eval", "--model", f"hf:{hf_classifier}", "--data", images, "--method", "tome",
                         "--set", "r=4", "--workers", 0, "--json")
    assert result.exit_code == 0, result.output
    assert report["model"] == f"hf:{hf_classifier}" and report["n_images"] == 9
    assert report["tokens_per_layer"] == [17.0, 13.0]  # 16 patches and the class token, then 4 fewer
    assert report["gflops"] < report["baseline_gflops"]


@torch.no_grad()
def test_zero_shot_logits_are_clips_own_image_text_logits(hf_clip, images):
    """Classes come from the folders ("a photo of a {}."); the logits are what CLIPModel gives for those prompts."""
    from atm_cli.evaluation import load_image_folder, load_model

    loaded = load_model(f"hf:{hf_clip}", device="cpu")
    image_set = load_image_folder(images, loaded)
    assert loaded.num_classes == 3 and image_set.class_to_model_index == {"a": 0, "b": 1, "c": 2}
    batch = torch.stack([image_set.dataset[i][0] for i in range(4)])
    clip = loaded.model.inner
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_clip)
    prompts = tokenizer([f"a photo of a {name}." for name in CLASSES], padding=True, return_tensors="pt")
    expected = clip(pixel_values=batch, **prompts).logits_per_image
    torch.testing.assert_close(loaded.model(batch), expected, atol=1e-4, rtol=1e-4)


def test_stress_runs_end_to_end_on_a_transformers_vit_and_an_open_clip_tower(hf_classifier, tiny_open_clip, images):
    for model in (f"hf:{hf_classifier}", tiny_open_clip):
        report, result = run("stress", "--model", model, "--no-pretrained", "--data", images, "--methods",
                             "atm,tome", "--n-trials", 3, "--tolerance", 100, "--json")
        assert result.exit_code == 0, result.output
        assert [m["method"] for m in report["methods"]] == ["atm", "tome"]
        assert all(m["gflops"] < report["baseline_gflops"] for m in report["methods"])


def test_open_clip_without_weights_asks_for_them(tiny_open_clip, images):
    _, result = run("eval", "--model", tiny_open_clip, "--data", images)
    assert result.exit_code == 2
    assert "--checkpoint FILE" in result.stderr and "Traceback" not in result.output


def test_a_missing_library_names_the_extra_to_install(images, monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip then raises ImportError
    _, result = run("eval", "--model", "open_clip:ViT-B-32", "--no-pretrained", "--data", images)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "atm: error: open_clip is not installed: pip install 'atm-cli[openclip]'")


def test_commands_that_read_timm_internals_refuse_other_libraries(hf_classifier, images):
    _, result = run("probe", "--model", f"hf:{hf_classifier}", "--data", images)
    assert result.exit_code == 2 and "needs a timm model" in result.stderr
