"""`atm calibrate`: search alpha, beta and theta_min for a GFLOPs or time budget (or no drop) and write a preset."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from atm_cli.errors import UsageError, param

from . import checks
from . import model_data as options
from . import ranges
from . import speed_options

if TYPE_CHECKING:
    from atm_cli.calibration import CalibrationReport, Goal, Reduction, SpeedTarget, TrialEvent


def command(
    model: str = options.MODEL,
    checkpoint: Optional[Path] = options.CHECKPOINT,
    unsafe_checkpoint: bool = options.UNSAFE_CHECKPOINT,
    no_pretrained: bool = options.NO_PRETRAINED,
    data: Optional[Path] = typer.Option(None, "--data", metavar="DIR",
                                        help="ImageFolder to tune on. Default (atm-demo): the bundled 1,000 "
                                             "calibration images."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", metavar="DIR",
                                             help="Held-out ImageFolder the chosen setting is reported on. Default "
                                                  "(atm-demo, no --data): the bundled 2,000 test images."),
    limit: Optional[int] = options.limit_option(help="Tune on a class-balanced subset of --data."),
    target_gflops: Optional[float] = typer.Option(None, "--target-gflops", metavar="G",
                                                  help="Maximise top-1 subject to GFLOPs per image <= G."),
    target_reduction: Optional[float] = typer.Option(None, "--target-reduction", metavar="P",
                                                     help="Maximise top-1 with at least P% fewer GFLOPs than the "
                                                          "unmerged model."),
    no_drop: bool = typer.Option(False, "--no-drop",
                                 help="Minimise GFLOPs subject to top-1 >= the unmerged model's - tolerance."),
    tolerance: float = typer.Option(0.0, "--tolerance", metavar="T", help="--no-drop: top-1 points that may be lost."),
    min_agreement: Optional[float] = typer.Option(None, "--min-agreement", metavar="P",
                                                  help="Minimise GFLOPs keeping at least P% of images' top-1 class "
                                                       "equal to the unmerged model's (labels are not used)."),
    target_speedup: Optional[float] = typer.Option(
        None, "--target-speedup", metavar="S",
        help="Maximise top-1 at a predicted speedup of at least S over the unmerged model on this device, batch "
             "size and precision (a latency model timed here, cached); the result is then timed for real, and "
             "refused if it measured slower than the unmerged model."),
    target_latency_ms: Optional[float] = typer.Option(None, "--target-latency-ms", metavar="T",
                                                      help="Maximise top-1 at a predicted time of at most T ms per "
                                                           "batch on this device (as --target-speedup)."),
    cache_dir: Optional[Path] = speed_options.CACHE_DIR,
    n_trials: int = options.n_trials_option("Trials in the study (a resumed study continues up to this many)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", metavar="S", help="Stop starting trials after S seconds."),
    seed: int = options.seed_option("the sampler and of the --limit subset"),
    rule: str = typer.Option("paired", "--rule", metavar="paired|argmax",
                             help="How the setting is chosen among the trials: paired (budget: the most GFLOPs "
                                  "among those tied with the best; no-drop: the cheapest a paired test does not "
                                  "show losing) or argmax (the best on the tuning images). README: which holds "
                                  "better on new images."),
    split_layer: Optional[int] = ranges.SPLIT_LAYER,
    search_split_layer: bool = ranges.SEARCH_SPLIT_LAYER,
    paper_ranges: bool = ranges.PAPER_RANGES,
    alpha_range: Optional[str] = ranges.ALPHA_RANGE,
    beta_range: Optional[str] = ranges.BETA_RANGE,
    theta_min_range: Optional[str] = ranges.THETA_MIN_RANGE,
    step: Optional[float] = ranges.STEP,
    storage: Optional[str] = typer.Option(None, "--storage", metavar="URL|FILE",
                                          help="Keep trials in an RDB (sqlite:///calib.db, postgresql://...) or an "
                                               "Optuna journal file, to resume or to search with several processes."),
    study_name: Optional[str] = typer.Option(None, "--study-name", metavar="NAME",
                                             help="The study in --storage (default: from the model and the goal)."),
    batch_size: int = options.batch_size_option(aside="; the preset records it"),
    workers: int = options.workers_option(0, " (images are loaded once)"),
    device: str = options.DEVICE,
    precision: str = options.PRECISION,
    compile: str = options.COMPILE,
    out: Optional[Path] = typer.Option(None, "--out", metavar="PRESET.yaml", help="Write the preset here."),
    json_output: bool = options.JSON,
) -> None:
    """Find ATM's alpha, beta, theta_min for a GFLOPs or time budget, or the cheapest with no drop, as a preset."""
    import optuna

    from atm_cli.calibration import DataSettings, ModelSettings, SearchSettings, calibrate
    from atm_cli.calibration.study import finished_trials, redact
    from atm_cli.presets import save_preset

    space = ranges.range_flags(paper_ranges, alpha_range, beta_range, theta_min_range, step, split_layer,
                               search_split_layer)
    _check(target_gflops, target_reduction, no_drop, tolerance, min_agreement, target_speedup, target_latency_ms,
           rule, timeout, storage, study_name)
    goal = _goal(target_gflops, target_reduction, no_drop, tolerance, min_agreement, target_speedup,
                 target_latency_ms, cache_dir)
    checks.check_output(out, "--out")  # --out is written here, after the table and --json
    # The progress bar below reports every trial; a trial Ctrl-C cuts short is reported in one line, not Optuna's.
    optuna.logging.set_verbosity(optuna.logging.ERROR)

    console = Console(stderr=True)
    model = options.resolve_model(console, model)
    if storage is not None and study_name is None:
        study_name = f"atm-calibrate-{model}-{goal.key}"
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[best]}"),
               TimeElapsedColumn())
    try:
        # Off when stderr is not a terminal: a finished live display would leave a blank line in logs.
        with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
            task = bar.add_task("starting", total=n_trials, best="")

            def on_trial(event: TrialEvent) -> None:
                best = event.best
                scored = f"{best.top1:.2f}% top-1, " if best and min_agreement is None else ""
                text = f"best: {scored}{best.gflops:.4g} GFLOPs (trial {best.number})" if best else ""
                bar.update(task, description=f"trial {event.trial.number}", completed=event.done, best=text)

            report = calibrate(
                goal,
                ModelSettings(model, checkpoint, pretrained=not no_pretrained, device=device, precision=precision,
                              unsafe_checkpoint=unsafe_checkpoint, compile=compile),
                DataSettings(data, eval_data, limit=limit, batch_size=batch_size, workers=workers),
                SearchSettings(n_trials, timeout, seed=seed, rule=rule, ranges=space, storage=storage,
                               study_name=study_name),
                on_trial=on_trial, on_stage=lambda message: bar.update(task, description=message))
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (app.main): the count is the study's own, wherever it landed
        kept = f"{finished_trials(storage, study_name)} finished trials are kept in {redact(storage)} (study " \
               f"{study_name}); run the same command to " \
               "resume" if storage else "nothing was kept (no --storage)"
        console.print(f"interrupted: {kept}", highlight=False, soft_wrap=True)
        raise typer.Exit(options.INTERRUPTED_EXIT_CODE) from None

    report.preset.provenance.search_space = ranges.space_record(report.result.space)
    result = ranges.with_space(report.to_dict(), report.result.space)
    console.print(_table(report, result))
    _print_notes(console, report, result, pretrained=not no_pretrained)
    try:
        if out is not None:  # checked writable before the work; a disk that filled during it loses no result
            trials = f"the trials are kept in {redact(storage)} (study {study_name})" if storage \
                else "no --storage kept the trials"
            checks.written_or_said(out, "--out", lambda path: save_preset(report.preset, path),
                                   f"the chosen setting is in the table above{' and on stdout (--json)' if json_output else ''}"
                                   f", {trials}")
            result = ranges.with_space(report.to_dict(), report.result.space)  # with the preset's path
            console.print(f"preset written to {out}", highlight=False)
    finally:
        if json_output:
            typer.echo(json.dumps(result))


def _check(target_gflops: Optional[float], target_reduction: Optional[float], no_drop: bool, tolerance: float,
           min_agreement: Optional[float], target_speedup: Optional[float], target_latency_ms: Optional[float],
           rule: str, timeout: Optional[float], storage: Optional[str], study_name: Optional[str]) -> None:
    """Refuse flags that ask for no goal or several, values out of their range, and flags that go with others."""
    from atm_cli.calibration.goals import RULES

    goals = [target_gflops is not None, target_reduction is not None, no_drop, min_agreement is not None,
             target_speedup is not None, target_latency_ms is not None]
    if sum(goals) != 1:
        raise UsageError(f"give exactly one goal: {param('target_gflops')} G, {param('target_reduction')} P, "
                         f"{param('no_drop')}, {param('min_agreement')} P, {param('target_speedup')} S or "
                         f"{param('target_latency_ms')} T")
    if target_speedup is not None and not target_speedup > 1:
        raise UsageError(f"{param('target_speedup')} is a factor over the unmerged model, above 1, got "
                         f"{target_speedup}")
    if target_latency_ms is not None and not target_latency_ms > 0:
        raise UsageError(f"{param('target_latency_ms')} must be positive, got {target_latency_ms}")
    if rule not in RULES:
        raise UsageError(f"{param('rule')} is one of {', '.join(RULES)}, got {rule!r}")
    if target_reduction is not None and not 0 < target_reduction < 100:
        raise UsageError(f"{param('target_reduction')} is a percentage in (0, 100), got {target_reduction}")
    if min_agreement is not None and not 0 < min_agreement <= 100:
        raise UsageError(f"{param('min_agreement')} is a percentage in (0, 100], got {min_agreement}")
    if target_gflops is not None and target_gflops <= 0:
        raise UsageError(f"{param('target_gflops')} must be positive, got {target_gflops}")
    if tolerance < 0:
        raise UsageError(f"{param('tolerance')} must not be negative, got {tolerance}")
    if tolerance and not no_drop:
        raise UsageError(f"{param('tolerance')} goes with {param('no_drop')}")
    if timeout is not None and not timeout > 0:
        raise UsageError(f"{param('timeout')} must be a positive number of seconds, got {timeout}")
    if study_name is not None and storage is None:
        raise UsageError(f"{param('study_name')} names a study in a storage; give {param('storage')} too")


def _goal(target_gflops: Optional[float], target_reduction: Optional[float], no_drop: bool, tolerance: float,
          min_agreement: Optional[float], target_speedup: Optional[float], target_latency_ms: Optional[float],
          cache_dir: Optional[Path]) -> Goal | Reduction | SpeedTarget:
    """The goal the (checked) goal flags ask for."""
    from atm_cli.calibration import AgreementGoal, BudgetGoal, NoDropGoal, Reduction, SpeedTarget

    if no_drop:
        return NoDropGoal(tolerance)
    if min_agreement is not None:
        return AgreementGoal(agreement=min_agreement)
    if target_speedup is not None or target_latency_ms is not None:
        return SpeedTarget(target_speedup, target_latency_ms, cache_dir)
    if target_reduction is not None:
        return Reduction(target_reduction)
    return BudgetGoal(target_gflops)


def _table(report: CalibrationReport, result: dict) -> Table:
    r = report.reported
    table = Table(title=f"{result['model']}: best of {result['n_trials']} trials (trial {result['best_trial']}), "
                        f"{result['goal']}", title_justify="left")
    table.add_column("")
    table.add_column("ATM", justify="right")
    table.add_column("unmerged", justify="right")
    params = result["params"]
    split = params["split_layer"] if params.get("split_layer") is not None else "default"
    table.add_row("alpha / beta / theta_min", f"{params['alpha']:g} / {params['beta']:g} / {params['theta_min']:g}", "")
    table.add_row("split layer", str(split), "")
    table.add_row(f"top-1 % ({r.n_images} images)", _percent(r.top1), _percent(r.baseline_top1))
    table.add_row("agreement with unmerged top-1 %", f"{r.agreement:.2f}", "")
    table.add_row("top-5 %", _percent(r.top5), _percent(r.baseline_top5))
    table.add_row("GFLOPs / image", f"{r.gflops:.4g} ({-result['gflops_reduction']:+.1f}%)", f"{r.baseline_gflops:.4g}")
    if report.speed is not None:
        chosen = report.speed.chosen
        table.add_row(f"ms / batch of {report.speed.batch_size} (measured)", f"{1e3 * chosen.seconds:.1f}",
                      f"{1e3 * chosen.baseline_seconds:.1f}")
        table.add_row("speedup (measured, lowest-highest round)",
                      f"{chosen.speedup:.2f}x ({chosen.speedup_low:.2f}-{chosen.speedup_high:.2f})", "1x")
    if not report.shared_images:
        t = report.tuning
        table.add_row(f"tuning top-1 % ({t.n_images} images)", _percent(t.top1), _percent(t.baseline_top1))
        table.add_row("tuning agreement %", _percent(t.agreement), "")
        table.add_row("tuning GFLOPs / image", f"{t.gflops:.4g}", f"{t.baseline_gflops:.4g}")
    return table


def _percent(value: Optional[float]) -> str:
    return "no labels" if value is None else f"{value:.2f}"


def _print_notes(console: Console, report: CalibrationReport, result: dict, pretrained: bool) -> None:
    naive = result["naive_forward_passes"]
    share = 100.0 * result["study_forward_passes"] / naive if naive else 0
    console.print(f"search: {result['n_trials']} trials in the study, {result['trials_run']} run here "
                  f"({result['trials_pruned']} pruned, {result['trials_repeated']} repeating an earlier setting, in "
                  f"the study); the study ran {result['study_forward_passes']} images through the model vs {naive} "
                  f"for a naive search ({share:.0f}%), this process {result['forward_passes']}", highlight=False)
    if result["compiled"]:
        console.print(f"compiled: {result['compile_seconds']:.0f} s compiling, left out of every speed figure",
                      highlight=False)
    space = report.result.space
    console.print(f"ranges: alpha {space.alpha[0]:g}-{space.alpha[1]:g}, beta {space.beta[0]:g}-{space.beta[1]:g}, "
                  f"theta_min {space.theta_min[0]:g}-{space.theta_min[1]:g} (step {space.step:g}), {ranges.origin(space)}",
                  highlight=False)
    if report.constant is not None:
        console.print(f"seeded with the constant threshold {report.constant.alpha:g} (alpha = theta_min, beta = 0)",
                      highlight=False)
    chosen, argmax = report.result.best, report.result.argmax
    if argmax is not None and chosen.number != argmax.number:
        console.print(f"chose trial {chosen.number} ({chosen.gflops:.4g} GFLOPs on the tuning images) over the plain "
                      f"best on them, trial {argmax.number} ({argmax.gflops:.4g} GFLOPs): the paired test does not "
                      "tell them apart", highlight=False)
    if result["budget_note"]:
        console.print(f"note: {result['budget_note']}", highlight=False)
    if report.speed is not None:
        _print_speed(console, report)
    if report.reachable_gflops:
        low, high = report.reachable_gflops
        console.print(f"the ranges reach {low:.4g}-{high:.4g} GFLOPs (first batch)", highlight=False)
    if not pretrained:
        console.print(options.RANDOM_WEIGHTS_NOTE, highlight=False)
    if report.shared_images:
        console.print("note: tuned and reported on the same images, so top-1 is optimistic; "
                      "give --eval-data DIR for a held-out figure", highlight=False)
    else:
        console.print(f"reported on held-out images ({report.reported.data}); tuned on {report.tuning.data}",
                      highlight=False)


def _print_speed(console: Console, report: CalibrationReport) -> None:
    speed, goal = report.speed, report.result.goal
    chosen = speed.chosen
    console.print(f"timed on {speed.device}, batch {speed.batch_size}, {speed.precision}"
                  f"{', compiled' if speed.compiled else ''}, {chosen.repeats} rounds interleaved with the unmerged "
                  f"model (first tuning batch): {chosen.speedup:.2f}x measured, {speed.predicted_timed_speedup:.2f}x "
                  f"predicted on that batch ({speed.predicted_speedup:.2f}x over the tuning images)", highlight=False,
                  soft_wrap=True)
    for trial, bias in speed.corrections:
        console.print(f"chosen again: trial {trial} measured {bias:.2f} of the speedup predicted for it, so the "
                      "predicted target was raised by that much", highlight=False, soft_wrap=True)
    if speed.runner_up is not None:
        other = speed.runner_up_speed
        console.print(f"runner-up: trial {speed.runner_up}, {other.speedup:.2f}x measured "
                      f"({other.speedup_low:.2f}-{other.speedup_high:.2f})", highlight=False)
    if goal.speedup is not None and chosen.speedup < goal.speedup:
        console.print(f"note: measured {chosen.speedup:.2f}x, below the {goal.speedup:g}x asked for, and no finished "
                      "trial is predicted fast enough to make up the latency model's over-prediction here (a loaded "
                      "machine, or one noisy round); run more trials, or ask for a little more", highlight=False,
                      soft_wrap=True)
