"""Model families the engine serves, each described in the engine's terms (`parts.Backbone`)."""
from __future__ import annotations

from torch import nn

from .parts import Backbone, Wrapper

# The library a model class comes from -> the module that describes its models (imported on first use:
# transformers and open_clip are optional); any other model is taken for a timm VisionTransformer.
_FAMILIES = {"transformers": ".transformers_vit", "open_clip": ".open_clip_vit"}


def backbone_of(model: nn.Module) -> Backbone:
    """`model` in the engine's terms; ValueError, naming what is missing, for a model it cannot merge."""
    from importlib import import_module

    if isinstance(model, Wrapper):
        return backbone_of(model.inner)
    library = type(model).__module__.split(".")[0]
    return import_module(_FAMILIES.get(library, ".timm_vit"), __name__).backbone(model)
