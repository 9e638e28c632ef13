"""The paper's settings that the commands default to, in a module without torch: help text shows them.

`atm --help` and every command's help read these at start-up; the layers that use them import them
from here, so each number lives once.
"""

# The sweep of Appendix D that `atm calibrate` searches: these ranges, every 0.005.
PAPER_ALPHA = (0.945, 1.000)
PAPER_BETA = (0.015, 0.050)
PAPER_THETA_MIN = (0.800, 0.945)
PAPER_STEP = 0.005

# DeiT-S's setting (Table A2): `atm eval`'s fallback for a model without a default preset.
PAPER_DEIT_S = {"alpha": 0.985, "beta": 0.045, "theta_min": 0.88}

from .engine import METHODS as REGISTRY

# The methods Table 1, Fig. 4 and Fig. 5 compare: every registered method (ATM first), then the paper's
# Fig. 5 schedules, one-parameter ladders of `atm stress` and `atm compare`.
METHODS = (*REGISTRY, "threshold", "tome-increasing", "tome-decreasing")

BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5)  # Fig. 4's GFLOPs budgets, as shares of the unmerged model's
PROBE_THRESHOLDS = (0.80, 0.85, 0.90, 0.95)  # Fig. 2's constant thresholds
