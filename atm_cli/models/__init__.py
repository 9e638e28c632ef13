"""Models that ship with atm (registered with timm on import)."""
from ..model_names import DEMO_MODEL_ALIAS
from .demo import DEMO_MODEL_NAME, DEMO_WEIGHTS

__all__ = ["DEMO_MODEL_ALIAS", "DEMO_MODEL_NAME", "DEMO_WEIGHTS"]
