"""The step registry (coevolve/core/steps.py) is the one place a step is declared: the run order, the
plan, the launch, `coevolve step`'s choices and the report's columns all read it, and a step added
there (its module and one entry) is planned and run with no other file touched."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import FAST, TINY

from coevolve import report
from coevolve.cli import main
from coevolve.core import rundir
from coevolve.core.config import Config, StepsConfig, load_config, prepare_run
from coevolve.core.launch import retries, step_command
from coevolve.core.plan import iteration_steps, step_plan
from coevolve.core.runner import run_step
from coevolve.core.steps import STEPS, Step, position

HELLO = """
def say_hello(tmp):
    tmp.mkdir()
    (tmp / "hello.txt").write_text("hello")
    return {"hello/count": 1}


def main(step):
    step.phase("greeting", say_hello)
    return step.finish({"hello": "greeting/hello.txt"})
"""


def everything_on() -> Config:
    return load_config(
        str(TINY),
        [*FAST, *(f"steps.{field}=true" for field in StepsConfig.model_fields), "e_step.mode=dpo+seft", "iterations=2"],
    )


def test_every_entry_names_a_module_and_a_config_switch_that_exist():
    for name, step in STEPS.items():
        assert step.name == name
        assert importlib.util.find_spec(step.module) is not None, step.module
        assert step.switch is None or step.switch in StepsConfig.model_fields, step.switch
        assert step.retry in Config.model_fields["retries"].annotation.model_fields
        assert step.depends_on and all(field.split(".")[0] in Config.model_fields for field in step.depends_on), (
            step.depends_on
        )


def test_the_plan_the_launch_the_cli_and_the_report_read_the_registry(capsys):
    cfg = everything_on()
    # With every switch on, each iteration holds the registry's steps for it, in the registry's order.
    assert iteration_steps(cfg, 0) == [n for n, s in STEPS.items() if s.iterations in ("zero", "any")]
    assert iteration_steps(cfg, 1) == [n for n, s in STEPS.items() if s.iterations in ("later", "any")]
    assert [position(n) for n in STEPS] == list(range(len(STEPS)))
    assert [k for k, _ in step_plan(cfg)] == sorted(k for k, _ in step_plan(cfg))

    launched = cfg.model_copy(update={"launch": cfg.launch.model_copy(update={"launcher": "accelerate"})})
    for name, step in STEPS.items():
        through_accelerate = "accelerate.commands.launch" in step_command(launched, name, Path("run"), 1)
        assert through_accelerate == step.trains, name
        assert retries(cfg, name) == getattr(cfg.retries, step.retry)

    with pytest.raises(SystemExit):
        main(["step", "--help"])
    assert ", ".join(STEPS) in " ".join(capsys.readouterr().out.split())

    assert report.columns() == [
        (label, s.name, key) for s in sorted(STEPS.values(), key=lambda s: not s.measures) for label, key in s.columns
    ]
    assert {s for _, s, _ in report.columns()} == {name for name, s in STEPS.items() if s.columns}


@pytest.fixture
def hello_step(tmp_path, monkeypatch):
    """A step that exists only in this test: its module in a folder on sys.path, its entry in the registry."""
    (tmp_path / "hello_step.py").write_text(HELLO)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(
        STEPS,
        "hello",
        Step(
            "hello",
            "hello_step",
            "zero",
            trains=False,
            retry="generation",
            depends_on=("seed",),
            columns=(("hello count", "hello/count"),),
        ),
    )
    yield "hello"
    sys.modules.pop("hello_step", None)


def test_a_step_added_to_the_registry_is_planned_and_run(hello_step, fresh_run):
    cfg = prepare_run(None, [], fresh_run)
    assert (0, hello_step) in step_plan(cfg)
    assert iteration_steps(cfg, 1)[-1] != hello_step  # an iteration-0 step only
    assert ("hello count", hello_step, "hello/count") in report.columns()
    assert retries(cfg, hello_step) == cfg.retries.generation

    done = run_step(hello_step, fresh_run, 0, cfg)
    assert done["outputs"] == {"hello": "iter_0/hello/greeting/hello.txt"} and done["metrics"]["hello/count"] == 1
    assert (fresh_run / done["outputs"]["hello"]).read_text() == "hello"
    assert [s for k, s, _ in rundir.finished_steps(fresh_run) if k == 0][-1] == hello_step
    with pytest.raises(Exception, match="runs at iteration 0"):
        run_step(hello_step, fresh_run, 1, cfg)


def test_a_switched_off_step_leaves_the_plan():
    cfg = everything_on()
    for name, step in STEPS.items():
        if step.switch:
            off = cfg.model_copy(update={"steps": cfg.steps.model_copy(update={step.switch: False})})
            assert name not in {s for _, s in step_plan(off)}, name
            assert dataclasses.replace(step, switch=None).enabled(off)
