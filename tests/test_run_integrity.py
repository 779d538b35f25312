"""A run directory that cannot be silently corrupted (issue 23): one command at a time, finished steps
that keep describing what they were made from, and steps that run only after what they read."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from coevolve.core import provenance, rundir
from coevolve.core.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def coevolve(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "coevolve", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("coevolve: error: "), proc.stderr
    return lines[0]


def snapshot(run: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run)): p.read_bytes() for p in [run / "config.yaml", *sorted(run.glob("iter_*/*/DONE.json"))]
    }


@pytest.fixture
def iterated_copy(iterated_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(iterated_run, run)
    return run


def test_a_second_command_on_a_run_dir_in_use_fails_at_once_naming_the_holder(fresh_run):
    first = subprocess.Popen(
        [sys.executable, "-m", "coevolve", "run", "--run-dir", str(fresh_run), "iterations=1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while not rundir.partial_dir(fresh_run, 1, "e-step").exists():
            assert first.poll() is None and time.time() < deadline, "the run ended before a second one could start"
            time.sleep(0.1)
        for args in (
            ["run", "--run-dir", fresh_run, "iterations=1"],
            ["step", "m-step", "--run-dir", fresh_run, "--iteration", 1],
        ):
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
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom coevolve.core import runlock\n"
            "with runlock.held(sys.argv[1], 'a test holder'):\n    print('held', flush=True)\n    time.sleep(600)",
            str(fresh_run),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
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


def test_changing_what_finished_steps_were_made_from_is_refused(iterated_copy):
    run = iterated_copy
    before = snapshot(run)
    line = one_error_line(
        coevolve("run", "--run-dir", run, "e_step.beta=0.3", "data.num_prompts=50", "policy={tiny: {hidden_size: 32}}")
    )
    for named in (
        "e_step.beta",
        "data.num_prompts",
        "policy.tiny.hidden_size",
        "iter_0/init",
        "iter_0/sft-warmup",
        "iter_1/e-step",
        "iter_1/m-step",
        "--redo",
    ):
        assert named in line, (named, line)
    assert snapshot(run) == before and not rundir.iter_dir(run, 2).exists()
    line = one_error_line(
        coevolve("step", "m-step", "--run-dir", run, "--iteration", 1, "m_step.train.learning_rate=0.1")
    )
    assert "m_step.train.learning_rate" in line and "iter_1/m-step" in line and "iter_1/e-step" not in line
    assert snapshot(run) == before
    # Fields no finished step was made from may change: they are saved, and nothing is redone.
    kept = coevolve("step", "m-step", "--run-dir", run, "--iteration", 1, "iterations=1", "tracking.project=elsewhere")
    assert kept.returncode == 0 and "already done" in kept.stderr, kept.stderr
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["iterations"] == 1 and saved["tracking"]["project"] == "elsewhere"
    assert {k: v for k, v in snapshot(run).items() if k != "config.yaml"} == {
        k: v for k, v in before.items() if k != "config.yaml"
    }


def test_forcing_a_step_makes_the_steps_built_on_it_stale_and_run_redoes_them(iterated_copy):
    run = iterated_copy
    m_before = rundir.read_done(run, 1, "m-step")
    forced = coevolve("step", "e-step", "--run-dir", run, "--iteration", 1, "--force", "e_step.beta=0.3")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "iteration 1 e-step: built on it, now stale: iter_1/m-step; `coevolve run` redoes them" in forced.stderr
    e_step = rundir.read_done(run, 1, "e-step")
    # A stale step is no base for the next: refused before anything is loaded.
    line = one_error_line(coevolve("step", "e-step", "--run-dir", run, "--iteration", 2))
    assert "iteration 1 m-step" in line and "stale" in line and "iter_1/e-step" in line, line
    assert not rundir.iter_dir(run, 2).exists()
    redo = coevolve("run", "--run-dir", run, "iterations=1")
    assert redo.returncode == 0, redo.stderr[-3000:]
    assert "iteration 1 m-step: stale (built on iter_1/e-step" in redo.stderr, redo.stderr[-3000:]
    assert "iteration 1 e-step: already done" in redo.stderr
    m_after = rundir.read_done(run, 1, "m-step")
    assert m_after["finished"] != m_before["finished"] and rundir.read_done(run, 1, "e-step") == e_step
    assert m_after["provenance"]["built_on"]["iter_1/e-step"] == e_step["finished"]


def test_steps_out_of_order_and_negative_iterations_are_refused(fresh_run):
    before = snapshot(fresh_run)
    line = one_error_line(coevolve("step", "e-step", "--run-dir", fresh_run, "--iteration", 5))
    assert "iteration 5 e-step needs iteration 4 e-step finished first" in line, line
    line = one_error_line(coevolve("step", "m-step", "--run-dir", fresh_run, "--iteration", 1))
    assert "iteration 1 m-step needs iteration 1 e-step finished first" in line, line
    line = one_error_line(coevolve("step", "e-step", "--run-dir", fresh_run, "--iteration", -1))
    assert "--iteration -1" in line, line
    assert snapshot(fresh_run) == before
    assert sorted(p.name for p in fresh_run.glob("iter_*")) == ["iter_0"] and not list(
        fresh_run.glob("stores/*/iter_[1-9]*")
    )


def test_commands_on_a_finished_run_write_nothing_in_it_unless_they_change_it(fresh_run, tmp_path):
    """Commands on a finished run write only what they must: config.yaml is not rewritten, and the
    report can go elsewhere, so a read-only run directory (an archived run) can still be reported on.
    (The tests run as root, whom chmod does not stop, so the files' times are what is checked.)"""
    config = fresh_run / "config.yaml"
    stamp = config.stat().st_mtime_ns
    done = coevolve("step", "rm-init", "--run-dir", fresh_run, "--iteration", 0)
    assert done.returncode == 0 and "already done" in done.stderr, done.stderr
    assert config.stat().st_mtime_ns == stamp
    report = coevolve("report", fresh_run, "--out", tmp_path / "report")
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "report" / "index.html").exists() and not (fresh_run / "report").exists()
    # Where the report cannot go, one line says so (as root, a file in its way stands for a read-only folder).
    (fresh_run / "report").write_text("in the way")
    line = one_error_line(coevolve("report", fresh_run))
    assert "report: cannot write the report there" in line and line.endswith("give --out DIR"), line


def test_a_step_begun_from_other_fields_starts_over_instead_of_resuming(fresh_run):
    partial = rundir.partial_dir(fresh_run, 1, "e-step")
    # What an e-step killed after its first phase, begun under another sampling temperature, leaves.
    (partial / "phases").mkdir(parents=True)
    (partial / "generate").mkdir()
    (partial / "phases" / "generate.json").write_text('{"metrics": {}, "seconds": 0.0, "io": {}}')
    begun = provenance.record(fresh_run, load_config(None, [], fresh_run), 1, "e-step")
    (partial / "provenance.json").write_text(
        json.dumps({**begun, "config": {**begun["config"], "sampling.temperature": 0.5}})
    )
    done = coevolve("step", "e-step", "--run-dir", fresh_run, "--iteration", 1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting it over" in done.stderr and "generate: done earlier, kept" not in done.stderr
    assert rundir.read_done(fresh_run, 1, "e-step")["metrics"]["generate/samples"] > 0


def test_a_step_is_stale_when_its_fields_changed_but_not_when_the_schema_gained_one(iterated_copy):
    run = iterated_copy
    cfg = load_config(None, [], run)
    assert provenance.stale_because(run, cfg, 1, "m-step") is None
    why = provenance.stale_because(run, load_config(None, ["m_step.train.learning_rate=0.1"], run), 1, "m-step")
    assert why == "made with other values of m_step.train.learning_rate than config.yaml holds now"
    assert provenance.stale_because(run, load_config(None, ["stores.replay={current: 1.0}"], run), 1, "m-step")
    # As if made before the schema had group_by_length (whose default keeps the old behaviour).
    path = rundir.step_dir(run, 1, "m-step") / "DONE.json"
    done = json.loads(path.read_text())
    del done["provenance"]["config"]["m_step.train.group_by_length"]
    path.write_text(json.dumps(done))
    assert provenance.stale_because(run, cfg, 1, "m-step") is None


def test_a_command_refused_on_a_new_run_directory_leaves_none_behind(tmp_path):
    line = one_error_line(
        coevolve("run", "--run-dir", tmp_path / "new", "--config", ROOT / "configs" / "tiny.yaml", "e_step.betta=1")
    )
    assert "unknown config field 'e_step.betta'" in line and not (tmp_path / "new").exists()


def test_a_step_run_before_finished_ones_later_makes_them_stale(iterated_copy):
    # As steps.reviser=true on a run with iteration 1 done, then `coevolve step reviser-train --iteration 1`.
    run = iterated_copy
    cfg = load_config(None, ["steps.reviser=true"], run)
    reviser = rundir.step_dir(run, 1, "reviser-train")
    reviser.mkdir()
    (reviser / "DONE.json").write_text(
        json.dumps({"step": "reviser-train", "iteration": 1, "finished": "2099-01-01T00:00:00.000+00:00"})
    )
    assert (
        provenance.stale_because(run, cfg, 1, "e-step")
        == "made before iter_1/reviser-train, which it would be built on now"
    )
    assert provenance.stale_because(run, cfg, 0, "rm-init") is None
