"""The merging engine: patch a timm VisionTransformer to merge tokens by ATM or ToMe.

It knows nothing of files, the command line or the search; every front end drives it through
`patch`, `unpatch` and `last_trace`.
"""
from .config import ATMConfig, MergeConfig, ToMeConfig, threshold_schedule, tome_schedule
from .patch import Trace, last_trace, patch, unpatch

__all__ = ["ATMConfig", "ToMeConfig", "MergeConfig", "Trace", "patch", "unpatch", "last_trace",
           "threshold_schedule", "tome_schedule"]
