"""`atm eval`: accuracy, GFLOPs and speed of a merging setting against the unmerged model, on one pass."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from atm_cli.errors import UsageError
from atm_cli.files import write_atomically

from . import checks
from . import method_options as methods
from . import model_data as options
from .charts import tokens_chart
from .method_options import MethodFlags

if TYPE_CHECKING:
    from atm_cli.evaluation import EvalReport

DEFAULT_WORKERS = min(4, os.cpu_count() or 1)
RESULT_SUFFIXES = (".csv", ".json")
# The columns of a --results-file CSV (EvalReport.to_dict's keys): a file with others is refused before the pass.
RESULT_COLUMNS = ("model", "model_tag", "checkpoint_sha256", "method", "params", "n_images", "skipped_images",
                  "batch_size", "device", "precision", "workers", "data", "data_fingerprint", "top1", "top5", "gflops",
                  "baseline_top1", "baseline_top5", "baseline_gflops", "gflops_reduction", "agreement",
                  "images_per_sec", "baseline_images_per_sec", "end_to_end_images_per_sec", "tokens_per_layer",
                  "baseline_tokens_per_layer", "interrupted", "n_files", "speedup", "compiled", "compile_seconds")


def command(
    model: str = options.MODEL,
    checkpoint: Optional[Path] = options.CHECKPOINT,
    unsafe_checkpoint: bool = options.UNSAFE_CHECKPOINT,
    no_pretrained: bool = options.NO_PRETRAINED,
    data: Optional[Path] = options.EVAL_DATA,
    class_map: Optional[Path] = typer.Option(None, "--class-map", metavar="FILE",
                                             help="Folder -> class index (JSON object or 'folder index' lines), "
                                                  "instead of matching folder names to the model's labels."),
    strict: bool = typer.Option(False, "--strict", help="Fail on an unreadable image instead of skipping it."),
    method: Optional[str] = methods.METHOD,
    set_: Optional[List[str]] = methods.SET,
    preset: Optional[str] = methods.PRESET,
    force: bool = methods.FORCE,
    alpha: Optional[float] = methods.ALPHA,
    beta: Optional[float] = methods.BETA,
    theta_min: Optional[float] = methods.THETA_MIN,
    split_layer: Optional[int] = methods.SPLIT_LAYER,
    r: Optional[str] = methods.R,
    batch_size: Optional[int] = options.batch_size_option(
        None, then=f" Default: the preset's, else {options.DEFAULT_BATCH_SIZE}."),
    workers: int = options.workers_option(DEFAULT_WORKERS),
    device: str = options.DEVICE,
    precision: str = options.PRECISION,
    compile: str = options.COMPILE,
    limit: Optional[int] = options.LIMIT,
    seed: int = options.seed_option("the --limit subset"),
    json_output: bool = options.JSON,
    results_file: Optional[Path] = typer.Option(None, "--results-file", metavar="FILE",
                                                help="Append a row to a .csv file, or write the JSON object to a "
                                                     ".json file."),
    plot: Optional[Path] = options.plot_option("the tokens merged in each block under ATM's thresholds (Fig. 6)"),
) -> None:
    """Evaluate a merging setting and the unmerged model on the same batches: top-1, top-5, GFLOPs, speed."""
    from atm_cli.analysis.visualize import plot_tokens_per_block
    from atm_cli.engine import ATMConfig, threshold_schedule
    from atm_cli.evaluation import DEMO_EVAL_DATA, evaluate, load_image_folder

    flags = MethodFlags(method, preset, alpha, beta, theta_min, split_layer, r, set_)
    if results_file is not None and results_file.suffix not in RESULT_SUFFIXES:
        raise UsageError(f"--results-file must end in .csv or .json, got {results_file}")
    options.check_plot(plot)
    checks.check_output(results_file, "--results-file")
    checks.check_csv_columns(results_file, RESULT_COLUMNS, "--results-file")

    console = Console(stderr=True)
    loaded = options.load(console, model, checkpoint, not no_pretrained, device, precision, unsafe_checkpoint, compile)
    choice = flags.resolve(loaded.name, loaded.checkpoint_sha256, force)
    batch_size = batch_size or choice.batch_size or options.DEFAULT_BATCH_SIZE
    images = load_image_folder(data if data is not None else DEMO_EVAL_DATA, loaded, class_map=class_map,
                               strict=strict, limit=limit, seed=seed)
    console.print(f"{loaded.name} on {images.n_files} images from {images.root}, batch {batch_size}, "
                  f"{loaded.device}; method: {choice.source}", highlight=False, soft_wrap=True)

    if choice.precision is not None and choice.precision != loaded.precision:
        console.print(f"note: the preset was measured at {choice.precision}, this run is {loaded.precision}: "
                      "token counts and top-1 may differ slightly", highlight=False, soft_wrap=True)
    speed_note = _speed_note(choice.preset, loaded, batch_size)
    if speed_note:
        console.print(speed_note, highlight=False, soft_wrap=True)
    with options.progress_bar(console, "evaluating") as progress:
        report = evaluate(loaded, images, choice.config, batch_size, workers, progress=progress,
                          keep_partial=True)

    result = report.to_dict()
    if report.method != "none" and result["images_per_sec"] < result["baseline_images_per_sec"]:
        console.print(f"warning: {report.method} ran slower than the unmerged model here "
                      f"({result['images_per_sec']:.1f} vs {result['baseline_images_per_sec']:.1f} images/s): at batch "
                      f"{batch_size} on {loaded.device} its overhead outweighs the FLOPs it saves", highlight=False,
                      soft_wrap=True)
    if report.skipped_images:
        shown = ", ".join(list(images.skipped_files)[:3])
        console.print(f"skipped {report.skipped_images} unreadable image(s): {shown}", highlight=False, soft_wrap=True)
    thresholds = (threshold_schedule(choice.config, len(report.merged.tokens_per_layer))
                  if isinstance(choice.config, ATMConfig) else None)
    # Figure 6 of the paper: mean tokens entering each block, beside the block's threshold.
    chart = tokens_chart(report.merged.tokens_per_layer, thresholds, full=report.baseline.tokens_per_layer[0], width=24)
    summary = Group(_result_table(report), Text(f"{report.method}: mean tokens entering each block\n{chart}"))
    try:
        options.finish(console, summary, result, json_output, plot,
                       lambda path: plot_tokens_per_block([*report.merged.tokens_per_layer, report.merged.tokens_left],
                                                          path, thresholds, title=f"{report.model}: tokens merged per block"),
                       interrupted=f"the figures cover the first {report.merged.n_images} of {report.n_files} images"
                       if report.interrupted else None)
    finally:  # after the table and --json: a disk that filled during the pass loses neither
        if results_file is not None:
            checks.written_or_said(results_file, "--results-file", lambda path: _write_results(path, result),
                                   "the result is in the table above" + (" and on stdout (--json)" if json_output else ""))


def _result_table(report: EvalReport) -> Table:
    d = report.to_dict()
    stopped = f" (interrupted, of {report.n_files})" if report.interrupted else ""
    table = Table(title=f"{report.model}, {report.merged.n_images} images{stopped}", title_justify="left")
    table.add_column("")
    table.add_column(report.method, justify="right")
    table.add_column("unmerged", justify="right")
    compiled = f", compiled ({d['compile_seconds']:.0f} s compiling, left out)" if d["compiled"] else ""
    # Speed first: users merge tokens for time, and GFLOPs do not predict it.
    table.add_row(f"images/s (model{compiled})", f"{d['images_per_sec']:.1f} ({d['speedup']:.2f}x)",
                  f"{d['baseline_images_per_sec']:.1f}")
    table.add_row("GFLOPs / image", f"{d['gflops']:.4g} ({-d['gflops_reduction']:+.1f}%)", f"{d['baseline_gflops']:.4g}")
    table.add_row("top-1 %", f"{d['top1']:.2f}", f"{d['baseline_top1']:.2f}")
    table.add_row("top-5 %", f"{d['top5']:.2f}", f"{d['baseline_top5']:.2f}")
    table.add_row("images/s (end to end)", f"{d['end_to_end_images_per_sec']:.1f}", "")
    table.add_row("top-1 agreement %", f"{d['agreement']:.2f}", "")
    return table


def _write_results(path: Path, result: dict) -> None:
    """The JSON object, or the CSV with one more row; atomically (a write cut short leaves the file as it was)."""
    if path.suffix == ".json":
        write_atomically(path, json.dumps(result, indent=2) + "\n")
        return
    row = {key: json.dumps(value) if isinstance(value, (list, dict)) else value for key, value in result.items()}
    checks.check_csv_columns(path, RESULT_COLUMNS, "--results-file")
    earlier = path.read_text(encoding="utf-8") if path.is_file() and path.stat().st_size > 0 else ""
    lines = io.StringIO()
    writer = csv.DictWriter(lines, fieldnames=RESULT_COLUMNS)
    if not earlier:
        writer.writeheader()
    writer.writerow(row)
    write_atomically(path, earlier + lines.getvalue())


def _speed_note(preset, loaded, batch_size: int) -> str | None:
    """One line when a preset's measured speedup comes from another device, batch size, precision or compile mode."""
    from atm_cli.evaluation.latency import device_name

    if preset is None or preset.measured.speedup is None:
        return None
    made = preset.provenance
    there = (made.device, preset.batch_size, made.precision or "fp32", bool(made.compiled))
    here = (device_name(loaded.device), batch_size, loaded.precision, loaded.compiled)
    if there == here:
        return None

    def described(where: tuple) -> str:
        return f"{where[0]}, batch {where[1]}, {where[2]}{', compiled' if where[3] else ''}"
    return (f"note: the preset's {preset.measured.speedup:.2f}x speedup was measured on {described(there)}; it does "
            f"not carry over to {described(here)} (this run measures its own)")
