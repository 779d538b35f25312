"""A run directory that cannot be silently corrupted (issue 23): one command at a time, finished steps
that keep describing what they were made from, and steps that run only after what they read."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from coevolve.core import rundir

ROOT = Path(__file__).resolve().parents[1]


def coevolve(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coevolve", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("coevolve: error: "), proc.stderr
    return lines[0]


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in [run / "config.yaml", *sorted(run.glob("iter_*/*/DONE.json"))]}


@pytest.fixture
def iterated_copy(iterated_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(iterated_run, run)
    return run


def test_a_second_command_on_a_run_dir_in_use_fails_at_once_naming_the_holder(fresh_run):
    first = subprocess.Popen([sys.executable, "-m", "coevolve", "run", "--run-dir", str(fresh_run), "iterations=1"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not rundir.partial_dir(fresh_run, 1, "e-step").exists():
            assert first.poll() is None and time.time() < deadline, "the run ended before a second one could start"
            time.sleep(0.1)
        for args in (["run", "--run-dir", fresh_run, "iterations=1"], ["step", "m-step", "--run-dir", fresh_run, "--iteration", 1]):
            began = time.time()
            line = one_error_line(coevolve(*args, timeout=120))
            assert time.time() - began < 60
            assert f"pid {first.pid}" in line and "coevolve run --run-dir" in line, line
        out, _ = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, out[-3000:]
    # The run went on undisturbed: every step finished once, from the inputs its log names.
    for k, name in [(0, "init"), (0, "sft-warmup"), (0, "rm-init"), (1, "e-step"), (1, "m-step")]:
        assert rundir.is_done(fresh_run, k, name)
    assert not list(fresh_run.glob("iter_*/.*.partial")) and not rundir.iter_dir(fresh_run, 2).exists()
    assert out.count("iteration 1 e-step (pid") == 1


def test_the_lock_of_a_process_that_died_is_taken_over(fresh_run):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom coevolve.core import runlock\n"
         "with runlock.held(sys.argv[1], 'a test holder'):\n    print('held', flush=True)\n    time.sleep(600)", str(fresh_run)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = one_error_line(coevolve("step", "init", "--run-dir", fresh_run, "--iteration", 0))
        assert f"pid {holder.pid}" in line and "a test holder" in line
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
    again = coevolve("step", "init", "--run-dir", fresh_run, "--iteration", 0)
    assert again.returncode == 0, again.stderr
    assert f"took over the lock of pid {holder.pid}" in again.stderr and "already done" in again.stderr
