"""The search behind `atm calibrate`: Optuna over alpha, beta and theta_min for a GFLOPs budget or no drop."""
from .calibrate import (PROBE_BATCHES, CalibrationReport, CalibrationRequest, ModelBatches, calibrate, search_budget,
                        search_no_drop, tally_of)
from .search import (BatchOutcome, BudgetGoal, Finished, NoDropGoal, Search, SearchResult, Tally, TrialEvent,
                     reachable_gflops)
from .space import SearchSpace

__all__ = ["PROBE_BATCHES", "CalibrationReport", "CalibrationRequest", "ModelBatches", "calibrate", "search_budget",
           "search_no_drop", "tally_of",
           "BatchOutcome", "BudgetGoal", "Finished", "NoDropGoal", "Search", "SearchResult", "Tally", "TrialEvent",
           "reachable_gflops", "SearchSpace"]
