"""Other libraries' models as the evaluation layer runs them: images in, one logit per class out.

The engine merges the wrapped model's tokens (`engine.Wrapper`); the wrapper only reads its output.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atm_cli.engine import Wrapper

PROMPT = "a photo of a {}."  # CLIP's usual zero-shot template (Radford et al., 2021)


class ClassifierLogits(Wrapper):
    """A transformers image classifier (`...ForImageClassification`): its `logits`."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, images: Tensor) -> Tensor:
        return self.inner(pixel_values=images).logits


class ZeroShotClassifier(Wrapper):
    """CLIP zero-shot classification: the image embedding's cosine similarity with each class's prompt
    embedding ("a photo of a {class}."), times the model's logit scale. The classes are set by name
    (`set_classes`, from an image folder's class folders)."""

    def __init__(self, inner: nn.Module, encode_images: Callable[[Tensor], Tensor],
                 encode_prompts: Callable[[list[str]], Tensor], logit_scale: float):
        super().__init__()
        self.inner, self.encode_images, self.encode_prompts = inner, encode_images, encode_prompts
        self.logit_scale = logit_scale
        self.class_names: tuple[str, ...] = ()
        self.register_buffer("class_embeddings", torch.empty(0), persistent=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @torch.inference_mode()
    def set_classes(self, names: Sequence[str]) -> None:
        prompts = [PROMPT.format(name.replace("_", " ")) for name in names]
        self.class_embeddings = F.normalize(self.encode_prompts(prompts).float(), dim=-1)
        self.class_names = tuple(names)

    def forward(self, images: Tensor) -> Tensor:
        embeddings = F.normalize(self.encode_images(images).float(), dim=-1)
        if not self.class_names:  # no classes yet: no logits (the image tower still runs, e.g. to count its cost)
            return embeddings[:, :0]
        return self.logit_scale * embeddings @ self.class_embeddings.T
