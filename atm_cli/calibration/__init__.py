"""The search behind `atm calibrate`: Optuna over alpha, beta and theta_min for a goal, in a space measured from
the model (goals.py: goals, their keys and steps; stats.py: the paired statistics they prune and choose by;
space.py: ranges; seeding.py: before the trials; search.py: the loop; trials.py: stored trials; study.py: storages;
ranges.py: the ranges asked for; speed.py: the time goals; calibrate.py: the workflow and its settings)."""
from .calibrate import (PROBE_BATCHES, CalibrationReport, DataSettings, ModelSettings, SearchSettings, calibrate,
                        search_on, seed_constant)
from .goals import AgreementGoal, BudgetGoal, Goal, NoDropGoal, Reduction
from .ranges import RangeFlags
from .search import Search, SearchInterrupted, SearchResult, TrialEvent
from .seeding import reachable_gflops
from .space import SearchSpace
from .speed import SpeedTarget
from .trials import Finished

__all__ = ["PROBE_BATCHES", "CalibrationReport", "DataSettings", "ModelSettings", "SearchSettings", "calibrate",
           "search_on", "seed_constant", "AgreementGoal", "BudgetGoal", "Goal", "NoDropGoal", "Reduction",
           "RangeFlags", "Search", "SearchInterrupted", "SearchResult", "TrialEvent", "reachable_gflops",
           "SearchSpace", "SpeedTarget", "Finished"]
