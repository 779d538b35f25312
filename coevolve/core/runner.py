"""One step run in this process: the step modules by name, the checks before a step starts and the
stale steps it leaves. The CLI's `coevolve step` and the step server's preloading both read it, so
neither needs the other.

A step module is named, not imported, here: importing this costs none of the libraries the steps
import, and core imports nothing of the steps above it."""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

from coevolve.core import provenance, rundir
from coevolve.core.config import Config, ConfigError
from coevolve.core.plan import require_ready
from coevolve.core.step import StepRun
from coevolve.data.fingerprint import init_is_stale

log = logging.getLogger("coevolve")

STEPS = {
    "init": "coevolve.init_step",
    "sft-warmup": "coevolve.policy.sft_warmup",
    "rm-init": "coevolve.reward.rm_init",
    "reviser-train": "coevolve.revision.reviser_train",
    "revise": "coevolve.revision.revise",
    "e-step": "coevolve.policy.e_step",
    "m-step": "coevolve.reward.m_step",
    "evaluate": "coevolve.evaluate_step",
}
ITERATION_ZERO = {"init", "sft-warmup", "rm-init"}
ANY_ITERATION = {"evaluate"}


def run_step(name: str, run_dir: Path, iteration: int, cfg: Config, force: bool = False) -> dict:
    if name not in STEPS:
        raise ConfigError(f"unknown step {name!r}; steps: {sorted(STEPS)}")
    if iteration < 0:
        raise rundir.RunDirError(f"--iteration {iteration}: iterations are 0 (the starting point) or more")
    if name not in ANY_ITERATION and (name in ITERATION_ZERO) != (iteration == 0):
        raise ConfigError(f"step {name!r} runs at iteration {'0' if name in ITERATION_ZERO else '1 or later'}, not {iteration}")
    require_ready(run_dir, cfg, iteration, name)
    stale = rundir.is_done(run_dir, iteration, name) and provenance.stale_because(run_dir, cfg, iteration, name)
    if name == "init":
        force = force or init_is_stale(run_dir, cfg)
    step = StepRun(run_dir, iteration, name, cfg, force or bool(stale))
    if step.already_done:
        log.info(f"iteration {iteration} {name}: already done ({rundir.step_dir(run_dir, iteration, name)}), skipped; --force to redo")
        return rundir.read_done(run_dir, iteration, name)
    if stale:
        log.info(f"iteration {iteration} {name}: stale ({stale}); redoing it")
    module = importlib.import_module(STEPS[name])
    # Bad input is found before the step writes anything: the run directory stays as it was.
    if hasattr(module, "check"):
        module.check(step)
    with step:
        done = module.main(step)
    # Redone, it leaves the steps built on it stale: say so now rather than at the next run.
    stale_now = provenance.stale_after(run_dir, cfg, iteration, name)
    if stale_now:
        log.info(f"iteration {iteration} {name}: built on it, now stale: {', '.join(stale_now)}; `coevolve run` redoes them")
    return done
