"""The search behind `atm calibrate`: Optuna over alpha, beta and theta_min for a goal, in a space measured from
the model (goals.py: goals and their statistics; space.py: ranges; seeding.py: before the trials; search.py: the
loop; trials.py: stored trials; study.py: storages; model_batches.py: the model side; calibrate.py: the workflow)."""
from .calibrate import PROBE_BATCHES, CalibrationReport, CalibrationRequest, calibrate, search_on, seed_constant
from .goals import AgreementGoal, BudgetGoal, Goal, NoDropGoal
from .model_batches import ModelBatches, RangeFlags
from .search import Search, SearchInterrupted, SearchResult, TrialEvent
from .seeding import reachable_gflops
from .space import SearchSpace
from .trials import Finished

__all__ = ["PROBE_BATCHES", "CalibrationReport", "CalibrationRequest", "calibrate", "search_on", "seed_constant",
           "AgreementGoal", "BudgetGoal", "Goal", "NoDropGoal", "ModelBatches", "RangeFlags", "Search",
           "SearchInterrupted", "SearchResult", "TrialEvent", "reachable_gflops", "SearchSpace", "Finished"]
