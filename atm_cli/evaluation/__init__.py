"""Load models and image folders, run batches through merging models, measure what `atm eval` reports."""
from .data import DEMO_CALIB_DATA, DEMO_EVAL_DATA, ImageSet, iterate_batches, load_image_folder, make_loader, preload
from .measure import BatchRun, EvalReport, describe_method, evaluate, run_batches
from .models import LoadedModel, load_model, resolve_device

__all__ = ["DEMO_EVAL_DATA", "DEMO_CALIB_DATA", "LoadedModel", "load_model", "resolve_device", "ImageSet", "load_image_folder", "make_loader",
           "iterate_batches", "preload", "BatchRun", "EvalReport", "describe_method", "run_batches", "evaluate"]
