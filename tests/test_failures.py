"""A step that fails keeps its traceback in its log; the console and Prefect get one line, the log's
path and the log's last lines, not the trainer's output."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from coevolve.core.launch import StepFailed

from conftest import TINY

# A step whose phase fails as a bug in a library would: a ValueError, which is no input error.
CRASH = """
def main(step):
    step.phase("boom", lambda tmp: int("not a number"))
"""
RUN = """
import sys
sys.path.insert(0, {folder!r})
from coevolve import cli
cli.STEPS["init"] = "crashing_step"
cli.main(sys.argv[1:])
"""


def test_a_crashed_step_logs_its_traceback_and_says_one_line(tmp_path):
    (tmp_path / "crashing_step.py").write_text(CRASH)
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", RUN.format(folder=str(tmp_path)), "step", "init", "--run-dir", str(run), "--iteration", "0", "--config", str(TINY)],
        capture_output=True, text=True,
    )
    log = run / "iter_0" / ".init.partial" / "log.txt"
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"coevolve: error: iteration 0 init failed: ValueError: invalid literal for int() with base 10: 'not a number'; its log: {log}"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and 'int("not a number")' in text and text.rstrip().endswith("'not a number'")


def test_step_failed_shows_the_error_the_log_path_and_the_logs_last_lines(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("".join(f"12:00:00 INFO line {i}\n" for i in range(40)) + "Traceback (most recent call last):\nValueError: boom\n")
    tail = [f"{{'loss': '0.{i}', 'grad_norm': '1.5', 'learning_rate': '0.0015'}}" for i in range(30)]
    tail.append(f"coevolve: error: iteration 1 e-step failed: ValueError: boom; its log: {log}")
    message = str(StepFailed("e-step", 1, 1, tail, log))
    lines = message.splitlines()
    assert lines[0] == f"step e-step (iteration 1) exited with code 1: iteration 1 e-step failed: ValueError: boom; its log: {log}"
    assert "'loss'" not in message and len(lines) <= 23
    assert lines[-1] == "ValueError: boom" and "line 39" in message and "line 10" not in message
