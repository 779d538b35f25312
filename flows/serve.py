"""`coevolve serve`: register the deployments and run their flow runs on this machine until stopped.
For several GPU machines, deploy to work pools instead (flows/prefect.yaml)."""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import prefect
from prefect.deployments.runner import EntrypointType

from coevolve.flows.coevolution import coevolve
from coevolve.flows.steps import coevolve_step


def serve(
    config_path: str | None,
    overrides: list[str],
    run_dir: str,
    name: str = "coevolve",
    cron: str | None = None,
    interval: float | None = None,
    gpu_limit: str | None = None,
) -> None:
    """Serve `coevolve/<name>` (a whole run; its parameters are the defaults of the UI's run form) and
    `coevolve-step/<name>` (one step; give it as a run's step_deployment to run each step as a job).
    `cron` or `interval` (seconds) puts the run on a schedule; a `{flow_run_name}` in `run_dir` gives
    each scheduled run its own directory."""
    # Absolute, so the defaults mean the same whatever directory a flow run starts in.
    parameters = {
        "run_dir": str(Path(run_dir).absolute()),
        "config": str(Path(config_path).absolute()) if config_path else None,
        "overrides": list(overrides),
        "gpu_limit": gpu_limit,
    }
    # Module entrypoints: the installed package is found from any working directory.
    run = coevolve.to_deployment(
        name,
        parameters=parameters,
        cron=cron,
        interval=timedelta(seconds=interval) if interval else None,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    step = coevolve_step.to_deployment(name, parameters={"gpu_limit": gpu_limit}, entrypoint_type=EntrypointType.MODULE_PATH)
    prefect.serve(run, step)
