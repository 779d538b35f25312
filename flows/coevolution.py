"""The `coevolve` flow: Mutual-Taught as Prefect runs it. Iteration 0 sets up the starting policy and
RM; each later iteration is a subflow whose steps (reviser, E-step, M-step, evaluation) are tasks that
launch `coevolve step ...` processes. Re-running with the same run directory continues from the first
step without a DONE.json."""
from __future__ import annotations

import re
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from coevolve.core.config import prepare_run
from coevolve.core import rundir, runlock
from coevolve.core.config import Config, EStepConfig
from coevolve.core.launch import retries
from coevolve.core.plan import step_plan
from coevolve.flows.steps import run_step

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
        config: YAML config; needed only when the run directory has no config.yaml yet.
        overrides: Config fields as key.sub=value, e.g. e_step.beta=0.1.
        iterations: Number of E-step/M-step iterations.
        e_step_mode: How the E-step improves the policy: dpo, seft (SFT on revised responses) or both.
        m_step: Refit the reward model each iteration.
        reviser: Train and run the SEFT reviser before each E-step.
        evaluate: Evaluate the policy and RM after each iteration.
        step_deployment: Run each step as a job of this deployment (e.g. coevolve-step/gpu-a) instead of
            as a process of this flow run.
        gpu_limit: Global concurrency limit counting this host's GPUs; each step holds cfg.launch.gpus slots.
    """
    run = Path(run_dir.replace("{flow_run_name}", flow_run.name))
    switches = {"iterations": iterations, "e_step.mode": e_step_mode, "steps.m_step": m_step, "steps.reviser": reviser, "steps.evaluate": evaluate}
    # Overrides as YAML scalars, so booleans read back as booleans.
    given = [f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in switches.items() if value is not None]
    # Held for the whole run; the step processes and step jobs it launches run under it (core/runlock.py).
    with runlock.held(run, f"prefect flow run {flow_run.name} (coevolve flow, run_dir={run_dir})"):
        cfg = prepare_run(config, [*(overrides or []), *given], run)
        plan = step_plan(cfg)
        for k in dict.fromkeys(k for k, _ in plan):
            steps = [step for i, step in plan if i == k]
            stopped = iteration(cfg, str(run), k, steps, step_deployment, gpu_limit)
            report(run, k, steps)
            if stopped:
                break
    return {key: str(path) for key in ("policy", "rm") if (path := rundir.latest_output(run, key))}


@flow(name="iteration", flow_run_name="iteration-{k}")
def iteration(cfg: Config, run_dir: str, k: int, steps: list[str], step_deployment: str | None, gpu_limit: str | None) -> bool:
    """Runs the iteration's steps in order; True when its E-step says to stop (the selected checkpoint
    won less than tau), in which case the rest of the run is skipped."""
    for step in steps:
        run_step.with_options(task_run_name=step, retries=retries(cfg, step))(cfg, run_dir, k, step, step_deployment, gpu_limit)
        if step == "e-step" and rundir.read_done(Path(run_dir), k, step)["stop"]:
            get_run_logger().info(f"iteration {k}: the E-step's best checkpoint won under tau={cfg.e_step.tau}; stopping with the previous policy")
            return True
    return False


def report(run: Path, k: int, steps: list[str]) -> None:
    """The iteration's step metrics as a table artifact, so the UI shows progress without W&B."""
    rows = []
    for step in steps:
        if not rundir.is_done(run, k, step):
            continue
        done = rundir.read_done(run, k, step)
        rows += [{"step": step, "metric": name, "value": _fmt(value)} for name, value in done["metrics"].items() if not isinstance(value, (list, dict))]
        rows.append({"step": step, "metric": "seconds", "value": _fmt(float(sum(done["timings"].values())))})
    # Keys allow only lowercase letters, digits and dashes; one key per run and iteration keeps history.
    key = re.sub(r"[^a-z0-9]+", "-", f"{run.name}-iteration-{k}".lower()).strip("-")
    create_table_artifact(rows, key=key, description=f"Iteration {k} of {run}: metrics from each step's DONE.json")


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
