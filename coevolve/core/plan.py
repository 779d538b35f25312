"""Which steps a run is made of, in order (read from the registry, core/steps.py): the plan that
`coevolve run`, the Prefect flow and `coevolve experiment` share; and which finished steps a step needs
before it may start."""

from __future__ import annotations

from pathlib import Path

from coevolve.core import provenance, rundir
from coevolve.core.config import Config
from coevolve.core.rundir import RunDirError
from coevolve.core.steps import STEPS, position
from coevolve.data.fingerprint import changed_since_init


def up_to_date(run: Path, cfg: Config, k: int, name: str) -> bool:
    """Finished, and still what config.yaml and the data files describe: a run skips it."""
    return (
        rundir.is_done(run, k, name)
        and not provenance.stale_because(run, cfg, k, name)
        and not (name == "init" and changed_since_init(run, cfg))
    )


def iteration_steps(cfg: Config, k: int) -> list[str]:
    """The steps of iteration k, in order."""
    return [name for name, step in STEPS.items() if step.runs_at(k) and step.enabled(cfg)]


def step_plan(cfg: Config) -> list[tuple[int, str]]:
    return [(k, s) for k in range(cfg.iterations + 1) for s in iteration_steps(cfg, k)]


def prerequisites(cfg: Config, k: int, name: str) -> list[tuple[int, str]]:
    """The steps (k, name) reads from: iteration k-1's, and those of iteration k before it, but those
    that only measure (evaluate): nothing waits for them."""
    order = position(name)
    earlier = [(k - 1, s) for s in iteration_steps(cfg, k - 1)] if k > 0 else []
    earlier += [(k, s) for s in iteration_steps(cfg, k) if position(s) < order]
    return [(i, s) for i, s in earlier if not STEPS[s].measures]


def require_ready(run: Path, cfg: Config, k: int, name: str) -> None:
    """Refuse to start (k, name) before the steps it reads are finished and still hold."""
    for i, s in prerequisites(cfg, k, name):
        if not rundir.is_done(run, i, s):
            raise RunDirError(
                f"{run}: iteration {k} {name} needs iteration {i} {s} finished first (coevolve step {s} --iteration {i}, or coevolve run)"
            )
        why = provenance.stale_because(run, cfg, i, s)
        if why:
            raise RunDirError(
                f"{run}: iteration {k} {name} needs iteration {i} {s}, which is stale ({why}); redo it first (coevolve run)"
            )
