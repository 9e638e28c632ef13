"""Load models and image folders, run batches through merging models, measure what `atm eval` reports."""
from .data import (DEMO_CALIB_DATA, DEMO_EVAL_DATA, ImageSet, iterate_batches, load_image_folder, load_unlabelled_images,
                   make_loader, preload)
from .measure import EvalReport, check_method, describe_method, evaluate, measure_batch
from .models import LoadedModel, load_model, resolve_device
from .outcomes import BatchOutcome, Comparison, Outcomes, agreement
from .workload import Workload, patched_view

__all__ = ["DEMO_EVAL_DATA", "DEMO_CALIB_DATA", "LoadedModel", "load_model", "resolve_device", "ImageSet", "load_image_folder", "load_unlabelled_images", "make_loader",
           "iterate_batches", "preload", "BatchOutcome", "Comparison", "Outcomes", "agreement", "EvalReport", "describe_method", "measure_batch",
           "check_method", "evaluate", "Workload", "patched_view"]
