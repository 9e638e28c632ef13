"""Fault injection (issue 22): storage that a crash, a full disk or a kill damaged, outputs that cannot be
written, signals, several processes, and hostile flags, files and folders.

Each test's docstring says what the user loses (nothing) and what they see (one line, and its exit code).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
import pytest
from PIL import Image
from typer.testing import CliRunner

import atm_cli.calibration  # noqa: F401 (the module `model_never_loads` patches)
import atm_cli.evaluation
from atm_cli.calibration.study import (SEEDING_ATTR, SurplusTrial, check_journal, claim_seeding, finish_seeding,
                                       open_storage, redact, up_to)
from atm_cli.calibration.trials import WORKER
from atm_cli.cli.app import app
from atm_cli.errors import UsageError
from atm_cli.evaluation.data import load_rgb
from atm_cli.presets import bundled_presets_dir, load_preset

from helpers import write_image_folder

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
optuna.logging.set_verbosity(optuna.logging.WARNING)
# Ranges given in full: a calibration measures none, so a trial is a few milliseconds on the tiny ViT.
RANGES = ["--alpha-range", "0.5,1.0", "--beta-range", "0.0,0.2", "--theta-min-range", "0.3,1.0", "--step", "0.01"]
STUDY = "faults"
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def calibrate_args(model: Path, data: Path, *extra: str) -> list[str]:
    return ["calibrate", "--model", str(model), "--data", str(data), "--batch-size", "4", "--no-drop", *RANGES,
            *map(str, extra)]


def eval_args(model: Path, data: Path, *extra) -> list[str]:
    return ["eval", "--model", str(model), "--data", str(data), "--workers", "0", "--method", "none",
            *map(str, extra)]


def one_error_line(outcome, code: int, *fragments: str) -> str:
    """The run's stderr is the one line `atm: error: ...` holding `fragments`, and it exited with `code`."""
    assert outcome.exit_code == code, outcome.output
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("atm: error: "), outcome.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def journal_trials(path: Path) -> dict[int, tuple]:
    """The finished trials of the study in a journal file, by number."""
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    study = optuna.load_study(study_name=STUDY, storage=storage)
    return {t.number: (t.params, t.value, t.state) for t in study.get_trials(states=FINISHED)}


@pytest.fixture
def model_never_loads(monkeypatch):
    """The checks under test must answer before any model (and so any image) loads."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded: the check came after the work had started")

    monkeypatch.setattr(atm_cli.evaluation, "load_model", refuse)
    monkeypatch.setattr(sys.modules["atm_cli.calibration.calibrate"], "load_model", refuse)


@pytest.fixture(scope="module")
def journal_study(tmp_path_factory, tiny_vit_dir) -> dict[str, Path]:
    """A journal holding a finished two-trial study of the tiny ViT; tests copy it before damaging it."""
    root = tmp_path_factory.mktemp("journal-study")
    data = write_image_folder(root / "images", {"a": 4, "b": 4, "c": 4})
    journal = root / "study.journal"
    outcome = runner.invoke(app, calibrate_args(tiny_vit_dir, data, "--n-trials", "2", "--storage", journal,
                                                "--study-name", STUDY))
    assert outcome.exit_code == 0, outcome.output
    return {"journal": journal, "data": data, "model": tiny_vit_dir}


@pytest.fixture
def journal_copy(journal_study, tmp_path) -> Path:
    journal = tmp_path / "study.journal"
    shutil.copy(journal_study["journal"], journal)
    return journal


# --- Storage -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("torn", [b'{"op_code":6,"worker_id":"0d64', b'{"op_code":6,"wor\n', b"{"],
                         ids=["cut-mid-record", "cut-then-newline", "one-byte"])
def test_a_torn_journal_resumes_with_every_complete_trial_and_says_so_in_one_line(journal_study, journal_copy, torn):
    """A crash, a full disk or a kill cut the journal's last record short. Lost: nothing, every complete trial
    stays as it was. Seen: one note line with the bytes dropped; the same command resumes the study."""
    before = journal_trials(journal_copy)
    journal_copy.write_bytes(journal_copy.read_bytes() + torn)
    outcome = runner.invoke(app, calibrate_args(journal_study["model"], journal_study["data"], "--n-trials", "3",
                                                "--storage", journal_copy, "--study-name", STUDY, "--json"))
    assert outcome.exit_code == 0, outcome.output
    notes = [line for line in outcome.stderr.splitlines() if "partial last record" in line]
    assert len(notes) == 1 and f"({len(torn)} bytes" in notes[0] and "every complete trial is kept" in notes[0]
    after = journal_trials(journal_copy)
    assert {number: after[number] for number in before} == before and len(after) == 3
    assert json.loads(outcome.stdout)["n_trials"] == 3


def test_a_damaged_record_inside_a_journal_is_refused_and_the_file_left_as_it_was(journal_study, journal_copy,
                                                                                 model_never_loads):
    """A record damaged in the middle (not a torn tail) cannot be repaired by dropping it. Lost: nothing (the
    file is not touched). Seen: one line naming the line, exit 2, before the model loads."""
    lines = journal_copy.read_bytes().split(b"\n")
    lines[2] = lines[2][:20]
    journal_copy.write_bytes(b"\n".join(lines))
    damaged = journal_copy.read_bytes()
    outcome = runner.invoke(app, calibrate_args(journal_study["model"], journal_study["data"], "--storage",
                                                journal_copy, "--study-name", STUDY))
    one_error_line(outcome, 2, "has a damaged record at line 3")
    assert journal_copy.read_bytes() == damaged


@pytest.mark.parametrize("text", [b"my notes\nsecond line\n", b"a single line without its newline",
                                  b'{"name": "a JSON line, but no journal record"}\n'],
                         ids=["text", "one-line", "json-lines"])
def test_a_file_that_is_not_a_journal_is_refused_and_left_untouched(journal_study, tmp_path, text,
                                                                    model_never_loads):
    """--storage names a file that is no Optuna journal (a typo, the wrong tab completion). Lost: nothing,
    not a byte is appended. Seen: one line, exit 2, before the model loads."""
    notes = tmp_path / "notes.txt"
    notes.write_bytes(text)
    outcome = runner.invoke(app, calibrate_args(journal_study["model"], journal_study["data"], "--storage", notes))
    one_error_line(outcome, 2, "is not an Optuna journal")
    assert notes.read_bytes() == text


def test_check_journal_alone_cuts_only_the_torn_tail(journal_copy):
    """The repair keeps every whole record: a journal that is whole is left byte for byte."""
    whole = journal_copy.read_bytes()
    assert check_journal(journal_copy, repair=True) == 0 and journal_copy.read_bytes() == whole
    journal_copy.write_bytes(whole + b'{"op_code":4,"work')
    assert check_journal(journal_copy, repair=False) == 18 and journal_copy.read_bytes().endswith(b"work")
    assert check_journal(journal_copy, repair=True) == 18 and journal_copy.read_bytes() == whole


def test_a_create_race_on_a_new_database_is_retried(tmp_path, monkeypatch):
    """Several processes create one new SQLite or PostgreSQL study at once: all but one find the tables made
    meanwhile. Lost: nothing. Seen: nothing, the loser retries."""
    from sqlalchemy.exc import OperationalError

    study_module = sys.modules["atm_cli.calibration.study"]
    real, calls = study_module.RDBStorage, []

    def racing(*args, **kwargs):
        calls.append(args)
        if len(calls) < 3:
            raise OperationalError("CREATE TABLE studies", {}, Exception("table studies already exists"))
        return real(*args, **kwargs)

    monkeypatch.setattr(study_module, "RDBStorage", racing)
    monkeypatch.setattr(study_module.time, "sleep", lambda seconds: None)
    assert open_storage(f"sqlite:///{tmp_path / 'new.db'}") is not None and len(calls) == 3


@pytest.mark.slow
def test_processes_creating_one_sqlite_study_at_once_all_open_it(tmp_path):
    """Three processes start on one new SQLite file at the same moment. Lost: nothing. Seen: all three open the
    study (none dies with `table studies already exists`)."""
    go, url = tmp_path / "go", f"sqlite:///{tmp_path / 'new.db'}"
    script = ("import pathlib, sys, time\nimport optuna\nfrom atm_cli.calibration.study import open_storage\n"
              "pathlib.Path(sys.argv[1]).touch()\n"
              f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.01)\n"
              f"optuna.create_study(storage=open_storage({url!r}), study_name='s', load_if_exists=True)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ready = [tmp_path / f"ready-{i}" for i in range(3)]
    processes = [subprocess.Popen([sys.executable, "-c", script, str(path)], env=env, stderr=subprocess.PIPE,
                                  text=True) for path in ready]
    deadline = time.time() + 120
    while not all(path.exists() for path in ready) and time.time() < deadline:
        time.sleep(0.05)  # every process has its imports done
    go.touch()
    errors = [process.communicate(timeout=120)[1] for process in processes]
    assert [process.returncode for process in processes] == [0] * 3, errors


def journal_study_for(tmp_path: Path) -> optuna.Study:
    from atm_cli.calibration.goals import NoDropGoal
    from atm_cli.calibration.study import open_study

    storage = open_storage(str(tmp_path / "seeding.journal"))
    return open_study(storage, STUDY, NoDropGoal(0.0), {"model": "m"}, seed=0, n_trials=4)


def ended_process() -> str:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return f"{socket.gethostname()}:{process.pid}"


def test_the_seeding_runs_in_one_process_and_a_seeding_cut_short_is_run_again(tmp_path):
    """Several processes share a study; one of them is killed while it seeds the study with the constant
    threshold. Lost: nothing, "never worse than the constant threshold" still holds: a process that joins
    while another seeds does not seed too (nor mark the seeding done), and one that resumes after the
    seeder died runs the seeding again."""
    study = journal_study_for(tmp_path)
    assert claim_seeding(study)  # it created the study
    alive = f"{socket.gethostname()}:{os.getppid()}"
    study.set_user_attr(SEEDING_ATTR, {"by": alive, "done": False})  # another live process is seeding
    assert not claim_seeding(study)
    finish_seeding(study)  # what a joining process calls after its (skipped) seeding
    assert study.user_attrs[SEEDING_ATTR] == {"by": alive, "done": False}

    study.set_user_attr(SEEDING_ATTR, {"by": ended_process(), "done": False})  # the seeder was killed
    assert claim_seeding(study) and study.user_attrs[SEEDING_ATTR] == {"by": WORKER, "done": False}
    finish_seeding(study)
    assert study.user_attrs[SEEDING_ATTR] == {"by": WORKER, "done": True}
    assert not claim_seeding(study)  # seeded: nobody seeds it again


def test_a_study_ends_with_exactly_n_trials_when_processes_start_trials_together():
    """Processes sharing a study start trials at the same moment as it reaches --n-trials. Lost: nothing.
    Seen: the study holds exactly --n-trials finished trials; a surplus trial fails without running."""
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=1.0))
    running = study.ask()  # another process's trial, in flight
    ran = []
    study.optimize(up_to(2, lambda trial: ran.append(trial.number) or 0.0), n_trials=3, catch=(SurplusTrial,))
    assert ran == []
    study.tell(running, 2.0)
    assert len(study.get_trials(states=FINISHED)) == 2
    assert [t.state for t in study.get_trials()][-1] == optuna.trial.TrialState.FAIL


PASSWORD = "hunter2"


def test_a_storage_password_is_never_printed(journal_study, model_never_loads):
    """A PostgreSQL URL with a password that cannot be opened. Lost: nothing. Seen: one line, exit 2, with the
    password as ***; before the model loads."""
    url = f"postgresql://alice:{PASSWORD}@127.0.0.1:9/atm"
    assert redact(url) == "postgresql://alice:***@127.0.0.1:9/atm"
    assert PASSWORD not in redact(f"postgresql://alice:{PASSWORD}@[bad/atm")
    with pytest.raises(UsageError) as refused:
        open_storage(url)
    assert PASSWORD not in str(refused.value)
    outcome = runner.invoke(app, calibrate_args(journal_study["model"], journal_study["data"], "--storage", url))
    one_error_line(outcome, 2, "cannot open the study storage 'postgresql://alice:***@127.0.0.1:9/atm'")
    assert PASSWORD not in outcome.output


# --- Outputs -----------------------------------------------------------------------------------------------------

OUTPUTS = [("eval", "--results-file", "result.json"), ("eval", "--results-file", "results.csv"),
           ("eval", "--plot", "tokens.png"), ("calibrate", "--out", "preset.yaml"), ("visualize", "--out", "tokens.png")]


@pytest.fixture
def read_only(tmp_path, monkeypatch) -> Path:
    """A folder whose files cannot be written (a read-only mount; as root `chmod` would not stop the writes)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    real_open = os.open

    def open_(path, flags, *args, **kwargs):
        if str(path).startswith(str(folder)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    return folder


@pytest.mark.parametrize("command, flag, name", OUTPUTS, ids=lambda value: str(value))
@pytest.mark.parametrize("fault", ["read-only folder", "read-only file", "missing folder", "a folder"])
def test_an_output_that_cannot_be_written_is_refused_before_any_image_loads(command, flag, name, fault, read_only,
                                                                          tmp_path, image_folder, tiny_vit_dir,
                                                                          model_never_loads):
    """--out, --results-file or --plot names a place that cannot be written. Lost: nothing, no minutes of work
    are spent first. Seen: one line naming the flag, exit 2, before the model and the images load."""
    if flag == "--plot":
        pytest.importorskip("matplotlib", reason="plots are the optional atm-cli[plot] extra")
    path = {"read-only folder": read_only / name, "read-only file": read_only / name,
            "missing folder": tmp_path / "nowhere" / name, "a folder": tmp_path / name}[fault]
    if fault == "read-only file":
        path.write_text("kept\n")
    if fault == "a folder":
        path.mkdir()
    args = {"eval": eval_args(tiny_vit_dir, image_folder, flag, path),
            "calibrate": calibrate_args(tiny_vit_dir, image_folder, flag, path),
            "visualize": ["visualize", str(next(image_folder.glob("a/*.jpg"))), "--model", str(tiny_vit_dir),
                          "--out", str(path)]}[command]
    outcome = runner.invoke(app, args)
    one_error_line(outcome, 2, f"{flag} {path}")
    assert sorted(p.name for p in read_only.iterdir()) == ([name] if fault == "read-only file" else [])


def test_a_results_csv_with_other_columns_is_refused_before_the_pass(image_folder, tiny_vit_dir, tmp_path,
                                                                   model_never_loads):
    """--results-file names a CSV that another tool wrote. Lost: nothing (the file is untouched). Seen: one
    line, exit 2, before the pass rather than after it."""
    table = tmp_path / "results.csv"
    table.write_text("name,score\nx,1\n")
    one_error_line(runner.invoke(app, eval_args(tiny_vit_dir, image_folder, "--results-file", table)), 2,
                   "has other columns")
    assert table.read_text() == "name,score\nx,1\n"


class FillingHandle:
    """A file handle on a disk that fills mid-write: half of what is written lands, then ENOSPC."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, text):
        self.handle.write(text[:len(text) // 2])
        self.handle.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *error):
        self.handle.close()


def fill_the_disk(monkeypatch) -> None:
    """From now on every text file opened for writing by descriptor (the atomic writers' temporary files) fills the disk."""
    real_fdopen = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        handle = real_fdopen(fd, mode, *args, **kwargs)
        return FillingHandle(handle) if "w" in mode else handle

    monkeypatch.setattr(os, "fdopen", fdopen)


def test_a_disk_that_fills_while_eval_writes_its_results_loses_neither_table_nor_json(image_folder, tiny_vit_dir,
                                                                                     tmp_path, monkeypatch):
    """The disk fills while `atm eval` writes --results-file after its pass. Lost: nothing, the table and the
    --json object are printed first, and a CSV keeps its earlier rows. Seen: one error line saying where the
    result is, exit 1; no 0-byte, half or temporary file is left."""
    table, as_json = tmp_path / "out" / "results.csv", tmp_path / "out" / "result.json"
    table.parent.mkdir()
    assert runner.invoke(app, eval_args(tiny_vit_dir, image_folder, "--results-file", table)).exit_code == 0
    earlier = table.read_bytes()
    fill_the_disk(monkeypatch)
    for path in (table, as_json):
        outcome = runner.invoke(app, eval_args(tiny_vit_dir, image_folder, "--results-file", path, "--json"))
        assert outcome.exit_code == 1, outcome.output
        assert json.loads(outcome.stdout)["n_images"] == 12
        errors = [line for line in outcome.stderr.splitlines() if line.startswith("atm: error:")]
        assert errors == [f"atm: error: cannot write --results-file {path}: No space left on device; the result "
                          "is in the table above and on stdout (--json)"]
        assert "top-1 %" in outcome.stderr
    assert sorted(p.name for p in table.parent.iterdir()) == ["results.csv"] and table.read_bytes() == earlier


def test_a_disk_that_fills_while_calibrate_writes_the_preset_keeps_the_trials(journal_study, journal_copy, tmp_path,
                                                                            monkeypatch):
    """The disk fills while `atm calibrate` writes --out. Lost: nothing, the table and the --json object (the
    chosen setting) are printed first and the trials stay in --storage. Seen: one error line saying where
    the result is, exit 1; no 0-byte or half preset is left."""
    folder = tmp_path / "presets"
    folder.mkdir()
    fill_the_disk(monkeypatch)
    outcome = runner.invoke(app, calibrate_args(journal_study["model"], journal_study["data"], "--n-trials", "2",
                                                "--storage", journal_copy, "--study-name", STUDY,
                                                "--out", folder / "preset.yaml", "--json"))
    assert outcome.exit_code == 1, outcome.output
    assert set(json.loads(outcome.stdout)["params"]) >= {"alpha", "beta", "theta_min"}
    errors = [line for line in outcome.stderr.splitlines() if line.startswith("atm: error:")]
    assert errors == [f"atm: error: cannot write --out {folder / 'preset.yaml'}: No space left on device; the chosen "
                      f"setting is in the table above and on stdout (--json), the trials are kept in {journal_copy} "
                      f"(study {STUDY})"]
    assert "alpha / beta / theta_min" in outcome.stderr
    assert list(folder.iterdir()) == [] and len(journal_trials(journal_copy)) == 2


# --- Flags and files ---------------------------------------------------------------------------------------------

BAD_FLAGS = [
    (["eval", "--seed", "-1"], "--seed must lie in 0..4294967295, got -1"),
    (["eval", "--seed", str(2**32)], "--seed must lie in 0..4294967295, got 4294967296"),
    (["calibrate", "--no-drop", "--seed", str(2**32)], "--seed must lie in 0..4294967295"),
    (["calibrate", "--no-drop", "--tolerance", "nan"], "--tolerance must be a finite number, got nan"),
    (["calibrate", "--target-gflops", "nan"], "--target-gflops must be a finite number, got nan"),
    (["calibrate", "--no-drop", "--alpha-range", "nan,0.99"], "--alpha-range must be a finite number, got nan"),
    (["calibrate", "--no-drop", "--beta-range", "0,inf"], "--beta-range must be a finite number, got inf"),
    (["calibrate", "--no-drop", "--step", "nan"], "--step must be a finite number, got nan"),
    (["calibrate", "--no-drop", "--step", "1e-12"], "the smallest step is 2e-05"),
    (["calibrate", "--no-drop", "--step", "-0.01"], "--step must be positive"),
    (["calibrate", "--no-drop", "--timeout", "-5"], "--timeout must be a positive number of seconds, got -5"),
    (["calibrate", "--no-drop", "--timeout", "nan"], "--timeout must be a finite number, got nan"),
]


@pytest.mark.parametrize("args, message", BAD_FLAGS, ids=lambda value: " ".join(value) if isinstance(value, list)
                         else "")
def test_a_bad_flag_is_one_line_and_exit_2_before_the_model_loads(args, message, model_never_loads):
    """A flag out of range, NaN or infinite, or a grid step that would fill memory. Lost: nothing. Seen: one
    line, exit 2, before the model loads."""
    one_error_line(runner.invoke(app, args), 2, message)


CLASS_MAPS = [
    ("map.json", '{"a": 5.9, "b": 1, "c": 2}', "the index of 'a' must be an integer, got 5.9"),
    ("map.json", '{"a": true, "b": 1, "c": 2}', "the index of 'a' must be an integer, got true"),
    ("map.json", "null", "a JSON null, not an object"),
    ("map.json", "[3]", "a JSON array, not an object"),
    ("map.json", "[" * 100_000 + "]" * 100_000, "class map"),
    ("map.txt", "a 0\nb 1.5\nc 2\n", "the index of 'b' must be an integer"),
    ("map.txt", "a 0\nb\nc 2\n", "entry 2 is not 'folder index'"),
    ("map.txt", "a 0\nb 1\ncaf\xe9 2\n".encode("latin-1"), "is not UTF-8 text"),
]


@pytest.mark.parametrize("name, content, message", CLASS_MAPS, ids=lambda value: str(value)[:12])
def test_a_class_map_of_any_shape_is_answered_in_one_line(name, content, message, image_folder, tiny_vit_dir,
                                                         tmp_path):
    """--class-map holds a float, a boolean, null, a list, deep nesting, a short line or Latin-1 text. Lost:
    nothing (no image is evaluated under a wrong label). Seen: one line, exit 2."""
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    one_error_line(runner.invoke(app, eval_args(tiny_vit_dir, image_folder, "--class-map", path)), 2, message)


@pytest.mark.parametrize("duplicate", ["batch_size: 3\n", "params:\n  alpha: 0.9\n"], ids=["top", "nested"])
def test_a_preset_with_a_duplicate_key_is_refused(duplicate, tmp_path, model_never_loads):
    """A hand-edited preset sets a key twice (YAML would let the last win, silently). Lost: nothing. Seen: one
    line naming the key and its line, exit 2, before the model loads."""
    text = (bundled_presets_dir() / "atm-demo-no-drop.yaml").read_text()
    if duplicate.startswith("params"):
        text = text.replace("params:\n", "params:\n  alpha: 0.9\n", 1)
    else:
        text += duplicate
    path = tmp_path / "edited.yaml"
    path.write_text(text)
    key = "alpha" if duplicate.startswith("params") else "batch_size"
    with pytest.raises(UsageError, match=f"duplicate key {key!r}"):
        load_preset(path, force=True)
    one_error_line(runner.invoke(app, ["eval", "--preset", str(path), "--limit", "2", "--workers", "0"]), 2,
                   f"duplicate key {key!r}")


# --- Data --------------------------------------------------------------------------------------------------------

def evaluated(tiny_vit_dir, folder) -> dict:
    outcome = runner.invoke(app, eval_args(tiny_vit_dir, folder, "--json"))
    assert outcome.exit_code == 0, outcome.output
    return {**json.loads(outcome.stdout), "stderr": outcome.stderr}


def test_a_symlink_loop_counts_each_real_file_once(image_folder, tiny_vit_dir, tmp_path):
    """Class folders hold links back up the tree and a linked folder. Lost: nothing, and nothing is counted
    twice: the images, top-1 and the data fingerprint are those of the real files."""
    plain = evaluated(tiny_vit_dir, image_folder)
    outside = tmp_path / "elsewhere"
    shutil.move(image_folder / "c", outside)
    (image_folder / "c").symlink_to(outside, target_is_directory=True)  # a linked class folder: followed once
    (image_folder / "a" / "loop").symlink_to(".", target_is_directory=True)
    (image_folder / "b" / "up").symlink_to("..", target_is_directory=True)
    (image_folder / "a" / "again.jpg").symlink_to(image_folder / "a" / "000.jpg")  # a second name for one file
    linked = evaluated(tiny_vit_dir, image_folder)
    assert (linked["n_images"], linked["skipped_images"]) == (12, 0)
    assert (linked["top1"], linked["data_fingerprint"]) == (plain["top1"], plain["data_fingerprint"])


@pytest.fixture
def alarm():
    """A test that would hang (a FIFO read forever) fails after a minute instead."""
    def hung(signum, frame):
        raise TimeoutError("hung for 60 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_dangling_link_and_a_fifo_named_jpg_are_skipped_and_counted(image_folder, tiny_vit_dir, tmp_path, alarm):
    """A link to a deleted file and a FIFO named *.jpg sit among the images. Lost: nothing (no crash, no hang).
    Seen: both skipped and counted like unreadable images, named on stderr."""
    (image_folder / "a" / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    os.mkfifo(image_folder / "b" / "pipe.jpg")
    result = evaluated(tiny_vit_dir, image_folder)
    assert (result["n_images"], result["skipped_images"], result["n_files"]) == (12, 2, 14)
    assert "a/gone.jpg" in result["stderr"] and "b/pipe.jpg" in result["stderr"]


def test_16_bit_and_float_images_are_scaled_to_8_bits_not_blank(tmp_path):
    """A 16-bit PNG and a float TIFF (scientific and medical images). Lost: nothing, their contrast is kept.
    Seen: the picture as it is, not the white or black square PIL's own conversion gives."""
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    pixels = np.asarray(load_rgb(str(tmp_path / "deep.png")))
    assert pixels.shape == (32, 32, 3) and (pixels[..., 0] == pixels[..., 2]).all()
    assert np.abs(pixels[..., 0] - np.rint(ramp.astype(float) * 255 / 65535)).max() == 0
    assert len(np.unique(pixels)) == 256  # the whole range, not blank

    unit = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    Image.fromarray(unit, "F").save(tmp_path / "float.tiff")
    floats = np.asarray(load_rgb(str(tmp_path / "float.tiff")))[..., 0]
    assert floats.min() == 0 and floats.max() == 255 and len(np.unique(floats)) == 256

    Image.fromarray(unit * 1000, "F").save(tmp_path / "unknown.tiff")
    with pytest.raises(ValueError, match="no known scale"):
        load_rgb(str(tmp_path / "unknown.tiff"))


def test_16_bit_images_in_a_folder_are_evaluated(image_folder, tiny_vit_dir):
    """A class of 16-bit PNGs. Lost: nothing, each is evaluated (none skipped, none blank)."""
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 65536, (36, 40), dtype=np.uint16)).save(image_folder / "c" / f"deep{i}.png")
    result = evaluated(tiny_vit_dir, image_folder)
    assert (result["n_images"], result["skipped_images"]) == (15, 0)


def test_a_decompression_bomb_is_skipped_and_counted_without_a_warning(image_folder, tiny_vit_dir, monkeypatch):
    """Images over PIL's pixel limit (one over twice it, which PIL refuses; one just over it, which PIL only
    warns about). Lost: nothing, the run goes on. Seen: both skipped and counted, no warning leaks."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # the folder's own images have 40 x 36 = 1440 pixels
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image_folder / "a" / "bomb.png")
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(image_folder / "b" / "large.png")
    with warnings.catch_warnings(record=True) as leaked:
        warnings.simplefilter("always")
        result = evaluated(tiny_vit_dir, image_folder)
    assert (result["n_images"], result["skipped_images"]) == (12, 2)
    assert "a/bomb.png" in result["stderr"] and "b/large.png" in result["stderr"]
    assert not [w for w in leaked if issubclass(w.category, Image.DecompressionBombWarning)]


# --- Signals -----------------------------------------------------------------------------------------------------

def test_an_interrupt_before_anything_finished_says_so_in_one_line(image_folder, tiny_vit_dir, monkeypatch):
    """Ctrl-C (or SIGTERM) while the model loads. Lost: nothing was finished yet. Seen: one line saying so,
    exit 130 (143 for SIGTERM, see `atm_cli.cli.app.main`)."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(atm_cli.evaluation, "load_model", interrupted)
    outcome = runner.invoke(app, eval_args(tiny_vit_dir, image_folder))
    assert outcome.exit_code == 130 and outcome.stderr.count("\n") == 1, outcome.output
    assert outcome.stderr == "interrupted before a result was ready: nothing was kept\n"


def atm_process(*args, slow_batches: bool = False) -> subprocess.Popen:
    """`atm ARGS` in a process; with `slow_batches`, each forward pass takes 0.3 s more, and stderr says
    `first batch done` once the first batch of a pass is measured (a signal then lands mid-pass)."""
    hook = ("import sys, time\nfrom atm_cli.evaluation import measure\nforward, calls = measure.measure_batch, []\n"
            "def slowed(*args, **kwargs):\n    outcome = forward(*args, **kwargs)\n    calls.append(1)\n"
            "    if len(calls) == 4:  # two warm-up passes, then the first batch, merged and not\n"
            "        print('first batch done', file=sys.stderr, flush=True)\n"
            "    time.sleep(0.3)\n    return outcome\nmeasure.measure_batch = slowed\n") if slow_batches else ""
    script = f"import sys\n{hook}from atm_cli.cli.app import main\nsys.argv[0] = 'atm'\nmain()\n"
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.slow
def test_sigterm_during_an_eval_pass_keeps_the_figures_so_far(image_folder, tiny_vit_dir, tmp_path):
    """`timeout`, Slurm or Kubernetes stop `atm eval` mid-pass with SIGTERM. Lost: nothing measured, the table,
    the --json object and the --results-file row cover the batches finished. Seen: one `interrupted:` line,
    exit 143."""
    table = tmp_path / "results.csv"
    process = atm_process(*eval_args(tiny_vit_dir, image_folder, "--batch-size", "2", "--json", "--results-file",
                                     table), slow_batches=True)
    for line in process.stderr:
        if line == "first batch done\n":
            break
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    result = json.loads(out)
    assert result["interrupted"] and 2 <= result["n_images"] < 12
    assert [line for line in err.splitlines() if line.startswith("interrupted")] == [
        f"interrupted: the figures cover the first {result['n_images']} of 12 images"]
    assert "Traceback" not in err and table.read_text().count("\n") == 2


@pytest.mark.slow
def test_sigterm_during_a_calibration_keeps_its_trials_and_the_same_command_resumes(journal_study, tmp_path):
    """SIGTERM stops `atm calibrate` mid-search. Lost: at most the trial in flight. Seen: one line with the
    finished trials the study really holds, exit 143; the same command resumes."""
    journal = tmp_path / "study.journal"
    args = calibrate_args(journal_study["model"], journal_study["data"], "--storage", journal, "--study-name",
                          STUDY, "--json")
    process = atm_process(*args, "--n-trials", "1000")
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        with contextlib.suppress(KeyError):  # KeyError: the study is not created yet
            if journal.exists() and len(journal_trials(journal)) >= 3:
                break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    kept = journal_trials(journal)
    assert process.returncode == 143 and out == "", err
    assert err.count("\n") == 1 and err.startswith(f"interrupted: {len(kept)} finished trials are kept in {journal}")

    resumed = runner.invoke(app, [*args, "--n-trials", str(len(kept) + 1)])
    assert resumed.exit_code == 0, resumed.output
    after = journal_trials(journal)
    assert {number: after[number] for number in kept} == kept and len(after) == len(kept) + 1


# --- PostgreSQL --------------------------------------------------------------------------------------------------

def postgres_programs() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, or where Debian's `postgresql` package puts them."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    installed = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return installed[-1].parent if installed else None


@pytest.fixture(scope="module")
def postgres() -> str:
    """A PostgreSQL server of the test run's own (a new cluster in a temporary folder, a free port, a password);
    its URL. Skipped with the reason where none can start, unless ATM_REQUIRE_POSTGRES is set (CI)."""
    required = bool(os.environ.get("ATM_REQUIRE_POSTGRES"))
    missing = pytest.fail if required else pytest.skip
    try:
        import psycopg  # noqa: F401 (SQLAlchemy's driver for postgresql:// URLs)
    except ImportError:
        missing("psycopg is not installed (pip install -e '.[test]')")
    programs = postgres_programs()
    if programs is None:
        missing("no PostgreSQL server here (Debian: apt-get install postgresql)")
    # Not under pytest's temporary folder, which only its owner may enter: the server may run as another user.
    root = Path(tempfile.mkdtemp(prefix="atm-postgres-"))
    as_server = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root: the package's own user runs them
        as_server = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    (root / "password").write_text(PASSWORD)
    if as_server:
        shutil.chown(root / "password", "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = root / "data"
    try:
        subprocess.run([*as_server, programs / "initdb", "-D", data, "-U", "atm", "--pwfile", root / "password",
                        "--auth", "scram-sha-256"], check=True, capture_output=True, timeout=120)
        subprocess.run([*as_server, programs / "pg_ctl", "-D", data, "-l", root / "log", "-w", "-t", "60",
                        "-o", f"-p {port} -h 127.0.0.1 -k {root}", "start"], check=True, capture_output=True,
                       timeout=120)
    except (OSError, subprocess.SubprocessError) as error:
        shutil.rmtree(root, ignore_errors=True)
        missing(f"the PostgreSQL server did not start: {error}")
    yield f"postgresql://atm:{PASSWORD}@127.0.0.1:{port}/postgres"
    subprocess.run([*as_server, programs / "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True,
                   timeout=120)
    shutil.rmtree(root, ignore_errors=True)


def rdb_trials(url: str) -> dict[int, tuple]:
    try:
        study = optuna.load_study(study_name=STUDY, storage=url)
    except KeyError:  # not created yet
        return {}
    return {t.number: (t.params, t.value, t.state) for t in study.get_trials(states=FINISHED)}


@pytest.mark.slow
def test_postgresql_two_processes_a_kill_and_a_resume(postgres, journal_study):
    """Two processes start one new study on a PostgreSQL server together; one is killed mid-search. Lost: at
    most its trial in flight. Seen: the other goes on, the same command resumes, and the study ends with
    exactly --n-trials; the password is never printed."""
    args = calibrate_args(journal_study["model"], journal_study["data"], "--storage", postgres, "--study-name",
                          STUDY, "--n-trials", "8", "--json")
    killed, other = atm_process(*args, "--seed", "1"), atm_process(*args, "--seed", "2")
    deadline = time.time() + 300
    while len(rdb_trials(postgres)) < 2 and time.time() < deadline and killed.poll() is None:
        time.sleep(0.05)
    killed.kill()
    killed.communicate()
    before = rdb_trials(postgres)
    out, err = other.communicate(timeout=300)
    assert other.returncode == 0, err
    assert PASSWORD not in out + err and json.loads(out)["storage"] == redact(postgres)

    resumed = runner.invoke(app, args)
    assert resumed.exit_code == 0, resumed.output
    assert PASSWORD not in resumed.output
    after = rdb_trials(postgres)
    assert len(after) == 8 and {number: after[number] for number in before} == before


def test_a_trial_left_nameless_by_a_killed_process_is_failed_on_resume(monkeypatch):
    """A kill between a trial's creation and its first act (naming its process) leaves it RUNNING with no
    owner; the resumed study must not count it as a live process's trial (it would run one trial too few).
    What a user loses: that trial only."""
    from atm_cli.calibration import study as study_module

    study = optuna.create_study()
    left_running = study.ask()
    named = study.ask()
    named.set_user_attr(study_module.WORKER_ATTR, study_module.WORKER)  # this live process's
    study_module.fail_dead_trials(study)
    assert study.trials[left_running.number].state == optuna.trial.TrialState.RUNNING  # just created: may be alive
    monkeypatch.setattr(study_module, "NAMELESS_SECONDS", -1.0)  # as if the grace had passed
    study_module.fail_dead_trials(study)
    assert study.trials[left_running.number].state == optuna.trial.TrialState.FAIL
    assert study.trials[named.number].state == optuna.trial.TrialState.RUNNING
