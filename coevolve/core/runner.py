"""Running a run: one step in this process (the checks before it starts, the stale steps it leaves),
the whole loop with each step its own process, and the rule that ends the loop early. `coevolve step`,
`coevolve run`, the Prefect flow and `coevolve experiment` all go through it; the steps themselves are
the registry's (core/steps.py)."""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

from coevolve.core import provenance, rundir
from coevolve.core.config import Config, ConfigError
from coevolve.core.launch import run_process, step_command
from coevolve.core.plan import require_ready, step_plan, up_to_date
from coevolve.core.step import StepRun
from coevolve.core.steps import STEPS
from coevolve.data.fingerprint import init_is_stale

log = logging.getLogger("coevolve")


def run_step(name: str, run_dir: Path, iteration: int, cfg: Config, force: bool = False) -> dict:
    if name not in STEPS:
        raise ConfigError(f"unknown step {name!r}; steps: {sorted(STEPS)}")
    if iteration < 0:
        raise rundir.RunDirError(f"--iteration {iteration}: iterations are 0 (the starting point) or more")
    if not STEPS[name].runs_at(iteration):
        raise ConfigError(
            f"step {name!r} runs at iteration {'0' if STEPS[name].iterations == 'zero' else '1 or later'}, not {iteration}"
        )
    require_ready(run_dir, cfg, iteration, name)
    stale = rundir.is_done(run_dir, iteration, name) and provenance.stale_because(run_dir, cfg, iteration, name)
    if name == "init":
        force = force or init_is_stale(run_dir, cfg)
    step = StepRun(run_dir, iteration, name, cfg, force or bool(stale))
    if step.already_done:
        log.info(
            f"iteration {iteration} {name}: already done ({rundir.step_dir(run_dir, iteration, name)}), skipped; --force to redo"
        )
        return rundir.read_done(run_dir, iteration, name)
    if stale:
        log.info(f"iteration {iteration} {name}: stale ({stale}); redoing it")
    module = importlib.import_module(STEPS[name].module)
    # Bad input is found before the step writes anything: the run directory stays as it was.
    if hasattr(module, "check"):
        module.check(step)
    with step:
        done = module.main(step)
    # Redone, it leaves the steps built on it stale: say so now rather than at the next run.
    stale_now = provenance.stale_after(run_dir, cfg, iteration, name)
    if stale_now:
        log.info(
            f"iteration {iteration} {name}: built on it, now stale: {', '.join(stale_now)}; `coevolve run` redoes them"
        )
    return done


def stopped(run: Path, k: int, name: str) -> bool:
    """The rules that end a run early, checked after each step: the E-step's best checkpoint won less
    than tau, or the M-step had no pseudo pair left to train on or its RM lost too much on held-out
    pairs (`m_step.max_heldout_drop`). The step decides, writes why in `stop`, and hands on the previous
    policy."""
    return rundir.is_done(run, k, name) and bool(rundir.read_done(run, k, name).get("stop"))


def stop_reason(run: Path, k: int, name: str) -> str | None:
    """The line that says why the run ends after (k, name), if it does."""
    if not stopped(run, k, name):
        return None
    return f"iteration {k}: {rundir.read_done(run, k, name)['stop']}; stopping with the previous policy"


def run_loop(cfg: Config, run_dir: Path, force: bool = False) -> None:
    """Every step of the plan, each in its own process (the same command a user would type), until the
    plan ends or the stop rule says."""
    for k, name in step_plan(cfg):
        # A stale step is redone by its own process, which says why.
        if not force and up_to_date(run_dir, cfg, k, name):
            log.info(f"iteration {k} {name}: already done, skipped")
        else:
            cmd = step_command(cfg, name, run_dir, k) + (["--force"] if force else [])
            code, tail = run_process(
                cmd, on_line=lambda line: print(line, file=sys.stderr, flush=True), launch=cfg.launch
            )
            if code != 0:
                step_log = rundir.partial_dir(run_dir, k, name) / "log.txt"
                if code == 2 and not step_log.exists():
                    raise SystemExit(2)  # bad input, refused before the step began: its one line is above
                raise SystemExit(f"iteration {k} {name} failed (exit {code}); its log: {step_log}")
        if stop := stop_reason(run_dir, k, name):
            log.info(stop)
            break
