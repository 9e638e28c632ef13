"""Models that ship with atm (registered with timm on import): the embedded default model and the
paper's backbones that timm lacks (LV-ViT, T2T-ViT_t, fine-tuned MAE)."""
from ..model_names import DEMO_MODEL_ALIAS
from . import lvvit, mae, t2t_vit
from .demo import DEMO_MODEL_NAME, DEMO_WEIGHTS

__all__ = ["DEMO_MODEL_ALIAS", "DEMO_MODEL_NAME", "DEMO_WEIGHTS", "lvvit", "mae", "t2t_vit"]
