"""`coevolve serve`: register the deployments and run their flow runs on this machine until stopped.
For several GPU machines, deploy to work pools instead (flows/prefect.yaml)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import prefect
from coevolve.flows.coevolution import coevolve
from coevolve.flows.steps import coevolve_step
from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
from prefect.deployments.runner import EntrypointType
from pydantic import ValidationError

from coevolve.core.config import ConfigError, Schedule, load_config


def serve(
    config_path: str | None,
    overrides: list[str],
    run_dir: str,
    name: str = "coevolve",
    cron: str | None = None,
    interval: float | None = None,
    gpu_limit: str | None = None,
) -> None:
    """Serve `coevolve/<name>-loop` (a whole run; its parameters are the defaults of the UI's run form)
    and `coevolve-step/<name>-step` (one step; give it as a run's step_deployment to run each step as a
    job). The run deployment's schedules are the config's `serve.schedules` and `cron` or `interval`
    (seconds); a `{flow_run_name}` in `run_dir` gives each scheduled run its own directory."""
    # Absolute, so the defaults mean the same whatever directory a flow run starts in.
    parameters = {
        "run_dir": str(Path(run_dir).absolute()),
        "config": str(Path(config_path).absolute()) if config_path else None,
        "overrides": list(overrides),
        "gpu_limit": gpu_limit,
    }
    # Module entrypoints: the installed package is found from any working directory.
    run = coevolve.to_deployment(
        f"{name}-loop",
        parameters=parameters,
        schedules=[to_prefect(s) for s in schedules(config_path, overrides, cron, interval)],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    step = coevolve_step.to_deployment(
        f"{name}-step", parameters={"gpu_limit": gpu_limit}, entrypoint_type=EntrypointType.MODULE_PATH
    )
    prefect.serve(run, step)


def schedules(
    config_path: str | None, overrides: list[str], cron: str | None, interval: float | None
) -> list[Schedule]:
    """The config's declared schedules, then the command line's. Bad ones are refused here, before
    anything is registered (the config, whole, as any command refuses it)."""
    declared = list(load_config(config_path, overrides).serve.schedules) if config_path else []
    for flag, given in (("--cron", {"cron": cron}), ("--interval", {"interval_s": interval})):
        if next(iter(given.values())) is not None:
            try:
                declared.append(Schedule(**given))
            except ValidationError as err:
                raise ConfigError(
                    f"command line: {flag}: {err.errors()[0]['msg'].removeprefix('Value error, ')}"
                ) from None
    return declared


def to_prefect(schedule: Schedule) -> CronSchedule | IntervalSchedule:
    if schedule.cron is not None:
        return CronSchedule(cron=schedule.cron)
    return IntervalSchedule(interval=timedelta(seconds=schedule.interval_s))
