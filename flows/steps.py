"""One step of a run as a Prefect task: skipped when its DONE.json exists and still holds (not stale:
core/provenance.py), else launched as its own process (`coevolve step ...`) with its output streamed
into the task log, or handed as a job to a `coevolve-step` deployment on a GPU host's work pool."""

from __future__ import annotations

import os
import shlex
from contextlib import nullcontext
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment
from prefect.runtime import flow_run
from prefect.states import Completed

from coevolve.core import rundir
from coevolve.core.config import Config, load_config
from coevolve.core.launch import StepFailed, run_process, step_command
from coevolve.core.plan import up_to_date
from coevolve.core.runlock import LOCK_ENV


def task_name(iteration: int, step: str) -> str:
    """A step's task and job name: the iteration in it, as the runs' lists show tasks without their flow."""
    return f"iter{iteration}-{step}"


def gpu_slots(limit: str | None, gpus: int, logger):
    """Hold `gpus` slots of the global concurrency limit `limit` (one slot per GPU of the host) while a
    step runs, so concurrent runs on one host wait instead of oversubscribing its GPUs."""
    if limit is None or gpus == 0:
        return nullcontext()
    # A waiting task shows as Running in the UI: its log says why it does not start.
    with get_client(sync_client=True) as client:
        held = client.read_global_concurrency_limit_by_name(limit)
    if held.active_slots + gpus > held.limit:
        logger.info(
            f"waiting for a GPU slot: limit {limit} has {held.active_slots} of {held.limit} taken, this step needs {gpus}"
        )
    # strict: a misspelt limit must fail the step, not silently run it unguarded.
    return concurrency(limit, occupy=gpus, strict=True)


# The run directory, not Prefect's result cache, says what is finished.
@task(cache_policy=NO_CACHE)
def run_step(
    cfg: Config,
    run_dir: str,
    iteration: int,
    step: str,
    step_deployment: str | None = None,
    gpu_limit: str | None = None,
    run_lock: str | None = None,
):
    run = Path(run_dir)
    if up_to_date(run, cfg, iteration, step):
        return Completed(name="Skipped", message=f"already done: {rundir.step_dir(run, iteration, step)}/DONE.json")
    if step_deployment is not None:
        as_job(step_deployment, run_dir, iteration, step)
        return
    logger = get_run_logger()
    cmd = step_command(cfg, step, run, iteration)
    logger.info(shlex.join(cmd))
    with gpu_slots(gpu_limit, cfg.launch.gpus, logger):
        code, tail = run_process(cmd, logger.info, env={LOCK_ENV: run_lock} if run_lock else None, launch=cfg.launch)
    if code != 0:
        raise StepFailed(step, iteration, code, tail, rundir.partial_dir(run, iteration, step) / "log.txt")


def as_job(deployment: str, run_dir: str, iteration: int, step: str) -> None:
    # The deployment's own gpu_limit default names its host's limit, so it is not passed from here.
    # The job's step runs under this flow's lock of the run directory, on whichever host the job lands.
    parameters = {"run_dir": run_dir, "step": step, "iteration": iteration, "run_lock": os.environ.get(LOCK_ENV)}
    job = run_deployment(deployment, parameters=parameters)
    if not job.state.is_completed():
        raise RuntimeError(
            f"step {step} (iteration {iteration}): job {job.name} ended {job.state.name}: {job.state.message}"
        )


def job_name() -> str:
    """A step job's flow run name: its run directory's, iteration and step, as in the runs list."""
    given = flow_run.parameters
    return f"{Path(given['run_dir']).name}-{task_name(given['iteration'], given['step'])}"


@flow(name="coevolve-step", flow_run_name=job_name)
def coevolve_step(
    run_dir: str, step: str, iteration: int, gpu_limit: str | None = None, run_lock: str | None = None
) -> None:
    """One step of an existing run, as a job on the host that serves this deployment.

    Args:
        run_dir: The run directory, on storage that every host sees.
        step: The step name, one of coevolve/core/steps.py's (e-step, m-step, ...).
        iteration: The iteration it belongs to (0 for init, sft-warmup, rm-init).
        gpu_limit: The global concurrency limit counting this host's GPUs; the step holds cfg.launch.gpus slots.
        run_lock: The token of the flow run holding the run directory's lock (core/runlock.py), under which
            the step runs; empty, the step takes the lock itself.
    """
    cfg = load_config(None, [], Path(run_dir))
    run_step.with_options(task_run_name=task_name(iteration, step))(
        cfg, run_dir, iteration, step, gpu_limit=gpu_limit, run_lock=run_lock
    )
