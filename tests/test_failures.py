"""A step that fails keeps its traceback in its log; the console and Prefect get one line, the log's
path and the log's last lines, not the trainer's output."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import TINY

from coevolve.cli import main
from coevolve.core.launch import StepFailed

# A step whose phase fails as a bug in a library would: a ValueError, which is no input error.
CRASH = """
def main(step):
    step.phase("boom", lambda tmp: int("not a number"))
"""
RUN = """
import sys
sys.path.insert(0, {folder!r})
import dataclasses
from coevolve import cli
from coevolve.core.steps import STEPS
STEPS["init"] = dataclasses.replace(STEPS["init"], module="crashing_step")
cli.main(sys.argv[1:])
"""


@pytest.mark.integration
def test_a_crashed_step_logs_its_traceback_and_says_one_line(tmp_path):
    (tmp_path / "crashing_step.py").write_text(CRASH)
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            RUN.format(folder=str(tmp_path)),
            "step",
            "init",
            "--run-dir",
            str(run),
            "--iteration",
            "0",
            "--config",
            str(TINY),
        ],
        capture_output=True,
        text=True,
    )
    log = run / "iter_0" / ".init.partial" / "log.txt"
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last
        == f"coevolve: error: iteration 0 init failed: ValueError: invalid literal for int() with base 10: 'not a number'; its log: {log}"
    )
    text = log.read_text()
    assert (
        "Traceback (most recent call last)" in text
        and 'int("not a number")' in text
        and text.rstrip().endswith("'not a number'")
    )


def test_a_bug_before_the_step_begins_keeps_its_traceback(tmp_path):
    # A FileNotFoundError is no input error unless one of ours says so: a bug's is not one line, exit 2.
    (tmp_path / "crashing_step.py").write_text(
        "def check(step):\n    open('/nonexistent/file')\n\ndef main(step):\n    pass\n"
    )
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            RUN.format(folder=str(tmp_path)),
            "step",
            "init",
            "--run-dir",
            str(run),
            "--iteration",
            "0",
            "--config",
            str(TINY),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "open('/nonexistent/file')" in proc.stderr
    assert proc.stderr.rstrip().endswith("FileNotFoundError: [Errno 2] No such file or directory: '/nonexistent/file'")


def test_step_failed_shows_the_error_the_log_path_and_the_logs_last_lines(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text(
        "".join(f"12:00:00 INFO line {i}\n" for i in range(40))
        + "Traceback (most recent call last):\nValueError: boom\n"
    )
    tail = [f"{{'loss': '0.{i}', 'grad_norm': '1.5', 'learning_rate': '0.0015'}}" for i in range(30)]
    tail.append(f"coevolve: error: iteration 1 e-step failed: ValueError: boom; its log: {log}")
    message = str(StepFailed("e-step", 1, 1, tail, log))
    lines = message.splitlines()
    assert (
        lines[0]
        == f"step e-step (iteration 1) exited with code 1: iteration 1 e-step failed: ValueError: boom; its log: {log}"
    )
    assert "'loss'" not in message and len(lines) <= 23
    assert lines[-1] == "ValueError: boom" and "line 39" in message and "line 10" not in message


def test_a_library_error_in_a_real_step_keeps_its_traceback_in_the_steps_log(fresh_run, capsys):
    # transformers refuses the scheduler with a ValueError while rm-init builds its trainer: a library's
    # error, no input error of ours, so it keeps its traceback.
    with pytest.raises(SystemExit) as stop:
        main(
            [
                "step",
                "rm-init",
                "--run-dir",
                str(fresh_run),
                "--iteration",
                "0",
                "--force",
                "rm_init.lr_scheduler_type=bogus",
            ]
        )
    log = fresh_run / "iter_0" / ".rm-init.partial" / "log.txt"
    assert stop.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    error = "ValueError: bogus is not a valid SchedulerType"
    assert last.startswith(f"coevolve: error: iteration 0 rm-init failed: {error}, please select one of [")
    assert last.endswith(f"; its log: {log}")
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "transformers/training_args.py" in text
    assert text.rstrip().splitlines()[-1].startswith(error)


def test_coevolve_run_names_the_log_of_the_step_that_failed(fresh_run):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "coevolve",
            "run",
            "--run-dir",
            str(fresh_run),
            "--redo",
            "rm_init.lr_scheduler_type=bogus",
        ],
        capture_output=True,
        text=True,
    )
    log = fresh_run / "iter_0" / ".rm-init.partial" / "log.txt"
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"iteration 0 rm-init failed (exit 1); its log: {log}"
    assert "Traceback" not in proc.stderr and "Traceback (most recent call last)" in log.read_text()
