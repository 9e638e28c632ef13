"""The search behind `atm calibrate`: Optuna over alpha, beta and theta_min for a GFLOPs budget or no drop."""
from .calibrate import CalibrationReport, CalibrationRequest, ModelBatches, calibrate, search_no_drop
from .search import (BatchOutcome, BudgetGoal, Finished, NoDropGoal, Search, SearchResult, Tally, TrialEvent,
                     reachable_gflops)
from .space import SearchSpace

__all__ = ["CalibrationReport", "CalibrationRequest", "ModelBatches", "calibrate", "search_no_drop",
           "BatchOutcome", "BudgetGoal", "Finished", "NoDropGoal", "Search", "SearchResult", "Tally", "TrialEvent",
           "reachable_gflops", "SearchSpace"]
