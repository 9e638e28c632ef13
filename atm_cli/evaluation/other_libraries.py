"""Models from Hugging Face transformers (`hf:FOLDER` or `hf:HUB_ID`) and open_clip (`open_clip:ARCH`), as
`(model, name, num_classes, data_config)`: the model maps images to logits, a classifier's own or, for a
CLIP model, zero-shot logits over the image folder's classes (`models.wrappers`). Both libraries are
optional extras, imported only here."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from atm_cli.errors import RunError, UsageError, first_line, param

HF_PREFIX, OPEN_CLIP_PREFIX = "hf:", "open_clip:"
# transformers classes by what the evaluation reads from them: logits, or zero-shot logits (text and image towers).
HF_CLASSIFIERS = ("ViTForImageClassification", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher",
                  "Dinov2ForImageClassification")
HF_ZERO_SHOT = ("CLIPModel", "SiglipModel")
_INTERPOLATIONS = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's resample codes in preprocessor configs


@dataclass
class OtherModel:
    model: nn.Module
    name: str
    num_classes: int  # 0 for a zero-shot classifier until its classes are set from a folder
    data_config: dict  # as timm resolves it: input_size, mean, std, interpolation, crop_pct, crop_mode
    weights: Path | None  # the local weights file, for its checksum
    label_names: tuple[str, ...] = ()


def is_other_library(name: str) -> bool:
    return name.startswith((HF_PREFIX, OPEN_CLIP_PREFIX))


def load_other_library(name: str, checkpoint: Path | None, pretrained: bool) -> OtherModel:
    if name.startswith(HF_PREFIX):
        if checkpoint is not None:
            raise UsageError(f"{param('checkpoint')} is for timm and open_clip models; {name} loads the weights in its folder")
        return _load_transformers(name.removeprefix(HF_PREFIX), pretrained)
    return _load_open_clip(name.removeprefix(OPEN_CLIP_PREFIX), checkpoint, pretrained)


def _import(module: str, extra: str):
    from importlib import import_module

    try:
        return import_module(module)
    except ImportError:
        raise UsageError(f"{module} is not installed: pip install 'atm-cli[{extra}]'") from None


def _load_transformers(source: str, pretrained: bool) -> OtherModel:
    transformers = _import("transformers", "hf")
    transformers.utils.logging.set_verbosity_error()  # its loading bars and notes would cut into our output
    transformers.utils.logging.disable_progress_bar()
    folder = Path(source)
    if not folder.is_dir() and (folder.exists() or source.startswith((".", "/"))):
        raise UsageError(f"hf:{source}: not a folder (expected config.json and model.safetensors in it)")
    try:
        config = transformers.AutoConfig.from_pretrained(source)
        preprocessing = _hf_preprocessing(transformers, source)
    except OSError as error:
        raise RunError(f"could not read hf:{source}: {first_line(error)}") from None
    architecture = (config.architectures or [None])[0]
    if architecture not in HF_CLASSIFIERS + HF_ZERO_SHOT:
        raise UsageError(f"hf:{source} is a {architecture or config.model_type}; atm evaluates "
                         f"{', '.join(HF_CLASSIFIERS + HF_ZERO_SHOT)}")
    model_class = getattr(transformers, architecture)
    try:
        model = model_class.from_pretrained(source) if pretrained else model_class(config)
    except (OSError, ValueError) as error:
        raise RunError(f"could not load hf:{source}: {first_line(error)}") from None
    from atm_cli.models.wrappers import ClassifierLogits, ZeroShotClassifier

    model.eval()
    weights = folder / "model.safetensors" if pretrained and (folder / "model.safetensors").is_file() else None
    if architecture in HF_CLASSIFIERS:
        labels = tuple(config.id2label[i] for i in range(config.num_labels))
        return OtherModel(ClassifierLogits(model), f"hf:{source}", config.num_labels, preprocessing, weights, labels)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    padding = "max_length" if architecture == "SiglipModel" else True  # SigLIP was trained on padded prompts

    def encode_prompts(prompts: list[str]) -> torch.Tensor:
        tokens = tokenizer(prompts, padding=padding, return_tensors="pt").to(model.device)
        return model.get_text_features(**tokens).pooler_output

    def encode_images(images: torch.Tensor) -> torch.Tensor:
        return model.get_image_features(pixel_values=images).pooler_output

    zero_shot = ZeroShotClassifier(model, encode_images, encode_prompts, model.logit_scale.exp().item())
    return OtherModel(zero_shot, f"hf:{source}", 0, preprocessing, weights)


def _hf_preprocessing(transformers, source: str) -> dict:
    """timm's data config from the model's preprocessor config (resize, crop, mean, std it was trained with)."""
    from transformers.utils import cached_file

    path = cached_file(source, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    if path is None:
        raise UsageError(f"hf:{source} has no preprocessor_config.json (the image size, mean and std the model "
                         "expects)")
    processor = json.loads(Path(path).read_text())
    crop = processor.get("crop_size") if processor.get("do_center_crop") else None
    size = processor.get("size") or {}
    resized = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
    height, width = (crop["height"], crop["width"]) if crop else resized
    return {"input_size": (3, height, width), "mean": tuple(processor["image_mean"]),
            "std": tuple(processor["image_std"]),
            "interpolation": _INTERPOLATIONS.get(processor.get("resample", 3), "bicubic"),
            "crop_pct": height / resized[0], "crop_mode": "center"}


def _load_open_clip(source: str, checkpoint: Path | None, pretrained: bool) -> OtherModel:
    open_clip = _import("open_clip", "openclip")
    architecture, _, tag = source.partition(":")
    if architecture not in open_clip.list_models():
        raise UsageError(f"open_clip has no model {architecture!r} (open_clip.list_models() lists them)")
    if pretrained and checkpoint is None and not tag:
        raise UsageError(f"open_clip:{architecture}: give {param('checkpoint')} FILE, a pretrained tag "
                         f"(open_clip:{architecture}:TAG) or {param('no_pretrained')}")
    weights = str(checkpoint) if checkpoint is not None else tag if pretrained else None
    try:
        model = open_clip.create_model(architecture, pretrained=weights)
    except Exception as error:  # open_clip, torch and the hub raise many kinds; all mean "cannot load"
        raise RunError(f"could not load open_clip:{source}: {first_line(error)}") from None
    from atm_cli.models.wrappers import ZeroShotClassifier

    model.eval()
    tokenizer = open_clip.get_tokenizer(architecture)

    def encode_prompts(prompts: list[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(prompts).to(model.logit_scale.device))

    preprocess = model.visual.preprocess_cfg
    data_config = {"input_size": (3, *model.visual.image_size), "mean": tuple(preprocess["mean"]),
                   "std": tuple(preprocess["std"]), "interpolation": preprocess.get("interpolation", "bicubic"),
                   "crop_pct": 1.0, "crop_mode": "center"}
    zero_shot = ZeroShotClassifier(model, model.encode_image, encode_prompts, model.logit_scale.exp().item())
    return OtherModel(zero_shot, f"open_clip:{source}", 0, data_config, checkpoint)
