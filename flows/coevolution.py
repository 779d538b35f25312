"""The `coevolve` flow: Mutual-Taught as Prefect runs it. Iteration 0 sets up the starting policy and
RM; each later iteration is a subflow whose steps (reviser, E-step, M-step, evaluation) are tasks that
launch `coevolve step ...` processes. Re-running with the same run directory continues from the first
step without a DONE.json. The flow run takes the run directory's name, and each iteration ends with the
run's report written and a summary of the iteration as a markdown artifact."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from coevolve.flows.steps import run_step, task_name
from coevolve.flows.summary import iteration_summary
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.runtime import deployment, flow_run

from coevolve.core import rundir, runlock
from coevolve.core.config import Config, EStepConfig, prepare_run
from coevolve.core.launch import retries
from coevolve.core.plan import iteration_steps
from coevolve.core.runner import stop_reason
from coevolve.core.terms import FLOW
from coevolve.report import write_report

# The config's own choices, so the UI form offers exactly these.
EStepMode = EStepConfig.model_fields["mode"].annotation


@flow(name="coevolve")
def coevolve(
    run_dir: str,
    config: str | None = None,
    overrides: list[str] | None = None,
    iterations: int | None = None,
    e_step_mode: EStepMode | None = None,
    m_step: bool | None = None,
    reviser: bool | None = None,
    evaluate: bool | None = None,
    step_deployment: str | None = None,
    gpu_limit: str | None = None,
) -> dict[str, str]:
    """Mutual-Taught co-evolution of a policy and its reward model. Empty fields keep the config's value.

    Args:
        run_dir: The run directory; re-running with the same one resumes it. `{flow_run_name}` in it is
            replaced by this flow run's name (a fresh directory per scheduled run).
        config: YAML config for a new run directory. One that has its config.yaml keeps it: a config given
            here must not differ from it, and the deployment's own default is not applied to it.
        overrides: Config fields as key.sub=value, e.g. e_step.beta=0.1; for an existing run directory,
            those that are not the deployment's defaults change its config.
        iterations: Number of E-step/M-step iterations.
        e_step_mode: How the E-step improves the policy: dpo, seft (SFT on revised responses), both, or
            online with grpo or rloo against the current RM.
        m_step: Refit the reward model each iteration.
        reviser: Train and run the SEFT reviser before each E-step.
        evaluate: Evaluate the policy and RM after each iteration.
        step_deployment: Run each step as a job of this deployment (e.g. coevolve-step/gpu-a) instead of
            as a process of this flow run.
        gpu_limit: Global concurrency limit counting this host's GPUs; each step holds cfg.launch.gpus slots.
    """
    run = Path(run_dir.replace("{flow_run_name}", flow_run.name))
    # Named after its run directory, so the runs list reads as the runs on disk, and a re-run on the
    # directory has the name of the run it continues. A directory named from the flow run's name is left
    # so: renamed, a Retry (the same flow run again) would resolve it to another directory.
    if "{flow_run_name}" not in run_dir:
        with get_client(sync_client=True) as client:
            client.set_flow_run_name(flow_run.id, run.name)
    config, overrides = for_this_run(run, config, overrides or [])
    switches = {
        "iterations": iterations,
        "e_step.mode": e_step_mode,
        "steps.m_step": m_step,
        "steps.reviser": reviser,
        "steps.evaluate": evaluate,
    }
    # Overrides as YAML scalars, so booleans read back as booleans.
    given = [
        f"{key}={str(value).lower() if isinstance(value, bool) else value}"
        for key, value in switches.items()
        if value is not None
    ]
    # Held for the whole run; the step processes and step jobs it launches run under it (core/runlock.py).
    with runlock.held(run, f"prefect flow run {run.name} (coevolve flow, run_dir={run_dir})"):
        cfg = prepare_run(config, [*overrides, *given], run, terms=FLOW)
        for k in range(cfg.iterations + 1):
            stopped = iteration(cfg, str(run), k, iteration_steps(cfg, k), step_deployment, gpu_limit)
            summarize(run, k, cfg)
            if stopped:
                break
    return {key: str(path) for key in ("policy", "rm") if (path := rundir.latest_output(run, key))}


@flow(name="iteration", flow_run_name="iteration-{k}")
def iteration(
    cfg: Config, run_dir: str, k: int, steps: list[str], step_deployment: str | None, gpu_limit: str | None
) -> bool:
    """Runs the iteration's steps in order; True when the stop rule (core/runner.py) ends the run after
    one of them, in which case the rest of the run is skipped."""
    for step in steps:
        name, started = task_name(k, step), time.monotonic()
        progress(f"{name}: started")
        run_step.with_options(task_run_name=name, retries=retries(cfg, step))(
            cfg, run_dir, k, step, step_deployment, gpu_limit
        )
        progress(f"{name}: finished in {time.monotonic() - started:.0f} s")
        if stop := stop_reason(Path(run_dir), k, step):
            progress(stop)
            return True
    return False


def progress(message: str) -> None:
    """A line in this iteration's log and in the top-level flow run's: `prefect deployment run --watch`
    follows that run's own logs, not its iteration subflows'."""
    get_run_logger().info(message)
    if parent := flow_run.parent_flow_run_id:
        logging.getLogger("prefect.flow_runs").info(message, extra={"flow_run_id": parent})


def for_this_run(run: Path, config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """The config and overrides that apply to `run`. A deployment's defaults (what `coevolve serve`
    filled the run form with) are for new run directories: one that has its config.yaml keeps it, so
    a deployment run on a killed run's directory resumes it. What the user gave beyond them applies."""
    if not (run / "config.yaml").exists() or deployment.id is None:
        return config, overrides
    with get_client(sync_client=True) as client:
        defaults = client.read_deployment(deployment.id).parameters
    return (None if config == defaults.get("config") else config), [
        o for o in overrides if o not in (defaults.get("overrides") or [])
    ]


def summarize(run: Path, k: int, cfg: Config) -> None:
    """The run's report, written again, and the iteration's numbers as a markdown artifact, so the UI
    shows how the run goes without W&B."""
    page = write_report(run)
    # Keys allow only lowercase letters, digits and dashes; one key per run and iteration keeps history.
    key = re.sub(r"[^a-z0-9]+", "-", f"{run.name}-iteration-{k}".lower()).strip("-")
    create_markdown_artifact(
        iteration_summary(run, k, cfg.e_step.tau, page.resolve()), key=key, description=f"Iteration {k} of {run}"
    )
