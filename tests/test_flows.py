"""The Prefect flows with the real tiny steps under a real Prefect server (tests/prefect_server.py): a
2-iteration run with its iteration summaries, a flow run holding its run directory and resuming after a
killed step, served deployments triggered from the CLI (a re-run on a run directory resumes it; declared
schedules survive a restart), a step waiting for a GPU slot, and the flow run's page and an iteration's
summary in a headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from conftest import FAST
from prefect import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
    LogFilterTaskRunId,
)
from prefect.client.schemas.sorting import LogSort
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings
from prefect_server import prefect_server  # noqa: F401  (the fixture)
from safetensors.torch import load_file

from coevolve.core import rundir
from coevolve.core.config import load_config
from coevolve.core.plan import step_plan

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
ARTIFACTS = ROOT / "test-artifacts"
# The reference run is evaluated, so its iteration summaries have the held-out numbers.
EVALUATED = ("steps.evaluate=true",)

# The flow in its own process, as a user would run it; prints its flow run id.
RUN_FLOW = """
import sys
from coevolve.flows.coevolution import coevolve
state = coevolve(run_dir=sys.argv[1], config=sys.argv[2], overrides=sys.argv[3:], return_state=True)
print("FLOW_RUN", state.state_details.flow_run_id, flush=True)
sys.exit(0 if state.is_completed() else 1)
"""


def start_flow(server, run: Path, log: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", RUN_FLOW, str(run), str(TINY), *FAST, *overrides],
        env=server.env(),
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        text=True,
    )


def flow_run_id(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if line.startswith("FLOW_RUN ")]
    assert lines, log.read_text()[-4000:]
    return lines[-1].split()[1]


def run_flow(server, run: Path, log: Path, *overrides: str) -> tuple[int, str]:
    proc = start_flow(server, run, log, *overrides)
    code = proc.wait(timeout=600)
    return code, flow_run_id(log)


@contextmanager
def client(server):
    with temporary_settings({PREFECT_API_URL: server.api_url, PREFECT_HOME: server.home}):
        with get_client(sync_client=True) as c:
            yield c


def flow_runs_under(c, parent: str) -> list:
    """The flow run and every run nested in it (iterations, step jobs)."""
    found = c.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[parent])))
    frontier = [parent]
    while frontier:
        children = c.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier))
        )
        found += children
        frontier = [r.id for r in children]
    return found


def final_task_runs(c, flow_run: str, timeout: float = 30) -> list:
    """Task runs under `flow_run`, once the server has recorded their final states (the task engine
    reports them through events, which may land just after the flow run ends)."""
    deadline = time.monotonic() + timeout
    while True:
        ids = [r.id for r in flow_runs_under(c, flow_run)]
        runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=200)
        if all(r.state is not None and r.state.is_final() for r in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(1)


def step_states(c, flow_run: str, steps: set[str]) -> dict[tuple[int, str], str]:
    """State names of the step task runs under `flow_run`, by (iteration, step), read from the task
    names (`iter2-e-step`)."""
    runs = final_task_runs(c, flow_run)
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state.name) for r in runs]
    states = {}
    for r in runs:
        named = re.fullmatch(r"iter(\d+)-(.+)", r.name)
        if named and named[2] in steps:
            states[int(named[1]), named[2]] = r.state.name
    return states


def copy_run(src: Path, dst: Path, upto: int) -> None:
    """`src` as it was when iteration `upto` began: later iterations' folders and store shards removed
    (a re-run iteration replaces its store shards whole, earlier ones stay as they were)."""
    shutil.copytree(src, dst)
    for path in [*dst.glob("iter_*"), *dst.glob("stores/*/iter_*"), *dst.glob("stores/*/.iter_*")]:
        if int(path.name.strip(".").split("_")[1].split(".")[0]) >= upto:
            shutil.rmtree(path)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    assert out, f"no weights in {folder}"
    return out


@pytest.fixture(scope="module")
def reference_run(prefect_server, tmp_path_factory):
    """One uninterrupted 2-iteration run of the tiny config, evaluated: (run directory, flow run id)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    code, flow_run = run_flow(prefect_server, run, run.parent / "flow.log", *EVALUATED)
    assert code == 0, (run.parent / "flow.log").read_text()[-4000:]
    return run, flow_run


@pytest.mark.slow
def test_two_iterations_complete_with_artifacts(prefect_server, reference_run):
    run, flow_run = reference_run
    cfg = load_config(None, [], run)
    plan = step_plan(cfg)
    with client(prefect_server) as c:
        assert c.read_flow_run(flow_run).state.is_completed()
        # Named after its run directory, not Prefect's random adjective-animal.
        assert c.read_flow_run(flow_run).name == run.name
        nested = flow_runs_under(c, flow_run)
        assert all(r.state.is_completed() for r in nested)
        assert sorted(r.name for r in nested if str(r.id) != flow_run) == [
            f"iteration-{k}" for k in range(cfg.iterations + 1)
        ]

        states = step_states(c, flow_run, {step for _, step in plan})
        assert sorted(states) == sorted(plan)
        assert set(states.values()) == {"Completed"}

        # Each step's own output reached its task's log, line by line.
        last = [r for r in final_task_runs(c, flow_run) if r.name == f"iter{plan[-1][0]}-{plan[-1][1]}"][-1]
        logs = c.read_logs(
            log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[last.id])), sort=LogSort.TIMESTAMP_DESC
        )
        assert any(f"{plan[-1][1]}: finished in" in log.message for log in logs), [log.message for log in logs][-20:]

        # Each step's start and end in the top-level run's own log, which `prefect deployment run --watch` follows.
        top = [
            log.message for log in c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run])))
        ]
        for k, step in plan:
            assert f"iter{k}-{step}: started" in top and any(
                m.startswith(f"iter{k}-{step}: finished in") for m in top
            ), top

        artifacts = c.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run])))
    by_key = {a.key: a for a in artifacts}
    assert set(by_key) == {f"run-iteration-{k}" for k in range(cfg.iterations + 1)}
    # Each iteration's summary: its numbers as the steps recorded them, and the report, written.
    assert (run / "report" / "index.html").is_file()
    for k in range(1, cfg.iterations + 1):
        text = by_key[f"run-iteration-{k}"].data
        assert by_key[f"run-iteration-{k}"].type == "markdown"
        gold = rundir.read_done(run, k, "evaluate")["metrics"]["eval/gold_mean"]
        assert f"| gold reward | {gold:.4g} |" in text
        m = rundir.read_done(run, k, "m-step")["metrics"]
        assert f"{m['pseudo/kept']} kept, {m['pseudo/dropped']} dropped" in text
        assert f"**stop**: {'yes' if rundir.read_done(run, k, 'e-step')['stop'] else 'no'}" in text
        assert f"- report: `{(run / 'report' / 'index.html').resolve()}`" in text


@pytest.mark.slow
def test_a_flow_run_holds_its_run_directory_and_a_killed_step_resumes_to_the_same_outputs(
    prefect_server, reference_run, tmp_path
):
    reference, _ = reference_run
    plan = step_plan(load_config(None, [], reference))
    last = plan[-1][0]
    # Iterations before the last are the reference's own, so the two runs differ only from here on.
    run = tmp_path / "run"
    copy_run(reference, run, upto=last)

    proc = start_flow(prefect_server, run, tmp_path / "killed.log", *EVALUATED)
    partial = rundir.partial_dir(run, last, "e-step")
    victim = None
    deadline = time.monotonic() + 300
    # Kill the E-step once it has finished a phase, so the resumed step must keep that phase's output.
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        if (partial / "phases").exists() and any((partial / "phases").glob("*.json")):
            victim = int(re.search(r"e-step \(pid (\d+)\)", (partial / "log.txt").read_text()).group(1))
        time.sleep(0.2)
    assert victim is not None, (tmp_path / "killed.log").read_text()[-4000:]
    # Forked by the step server (core/stepserver.py), not by the flow's process.
    assert "coevolve.core.stepserver" in psutil.Process(victim).parent().cmdline()
    # The flow holds the run directory's lock as `coevolve run` does, and its steps run under it: another
    # command on the run directory meanwhile is refused, naming the flow run. The step is stopped where it
    # is meanwhile, so that it is killed with its phase unfinished.
    os.kill(victim, signal.SIGSTOP)
    try:
        other = subprocess.run(
            [sys.executable, "-m", "coevolve", "step", "e-step", "--run-dir", str(run), "--iteration", str(last)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        os.kill(victim, signal.SIGKILL)
    assert other.returncode == 2 and f"in use by pid {proc.pid}" in other.stderr, other.stderr
    assert "prefect flow run" in other.stderr, other.stderr
    assert proc.wait(timeout=120) != 0
    killed = flow_run_id(tmp_path / "killed.log")

    code, resumed = run_flow(prefect_server, run, tmp_path / "resumed.log", *EVALUATED)
    assert code == 0, (tmp_path / "resumed.log").read_text()[-4000:]

    with client(prefect_server) as c:
        state = c.read_flow_run(killed).state
        assert state.is_failed()
        assert f"step e-step (iteration {last}) exited with code -9" in state.message
        states = step_states(c, resumed, {step for _, step in plan})
    assert states == {(k, step): "Skipped" if k < last else "Completed" for k, step in plan}

    assert "resuming after" in (rundir.step_dir(run, last, "e-step") / "log.txt").read_text()
    for step, output in [("e-step", "policy"), ("m-step", "rm")]:
        got = tensors(run / rundir.read_done(run, last, step)["outputs"][output])
        want = tensors(reference / rundir.read_done(reference, last, step)["outputs"][output])
        assert got.keys() == want.keys()
        assert all(torch.equal(got[name], want[name]) for name in want), (
            f"{step} {output} differs from the uninterrupted run"
        )


@contextmanager
def serving(server, log: Path, *args, **kwargs):
    """`coevolve serve` in its own process (flows/serve.py), until both its deployments are registered;
    stopped as Ctrl-C stops it on leaving."""
    code = f"from coevolve.flows.serve import serve; serve(*{args!r}, **{kwargs!r})"
    # The runner polls every second instead of every ten: each step's job is a flow run it picks up.
    served = subprocess.Popen(
        [sys.executable, "-c", code],
        env=server.env(PREFECT_RUNNER_POLL_FREQUENCY="1"),
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )
    names = [f"{kwargs['name']}-loop", f"{kwargs['name']}-step"]
    try:
        with client(server) as c:
            deadline = time.monotonic() + 120
            while (
                len(c.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=names)))) < 2
            ):
                assert served.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
                time.sleep(0.5)
        yield
    finally:
        served.send_signal(signal.SIGTERM)
        try:
            served.wait(timeout=30)
        except subprocess.TimeoutExpired:
            served.kill()


@pytest.mark.slow
def test_served_deployment_resumes_its_run_directory_and_keeps_its_schedules(prefect_server, reference_run, tmp_path):
    reference, _ = reference_run
    last = step_plan(load_config(None, [], reference))[-1][0]
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(rundir.step_dir(run, last, "m-step"))
    # One GPU slot: the step job must take it (the tiny config asks for one) and give it back.
    with client(prefect_server) as c:
        c.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="gpus-test", limit=1))
    # The deployment's defaults are the plain tiny config, which the run (made with FAST) differs from:
    # a re-run on the run's directory must resume it with its own config, not refuse it.
    declared = ["serve.schedules=[{interval_s: 31536000}]"]
    served = dict(name="tiny", cron="0 0 1 1 *", gpu_limit="gpus-test")
    with serving(prefect_server, tmp_path / "serve.log", str(TINY), declared, str(run), **served):
        with client(prefect_server) as c:
            deployment = c.read_deployment_by_name("coevolve/tiny-loop")
            c.read_deployment_by_name("coevolve-step/tiny-step")
        form = deployment.parameter_openapi_schema["properties"]
        assert {"run_dir", "config", "overrides", "iterations", "e_step_mode", "m_step", "reviser", "evaluate"} <= set(
            form
        )
        assert form["iterations"]["description"].startswith("Number of")
        assert form["e_step_mode"]["anyOf"][0]["enum"] == ["dpo", "seft", "dpo+seft", "grpo", "rloo"]
        schedules = declared_schedules(deployment)

        triggered = prefect_server.prefect(
            "deployment",
            "run",
            "coevolve/tiny-loop",
            "--param",
            "step_deployment=coevolve-step/tiny-step",
            "--watch",
            "--watch-timeout",
            "300",
            timeout=360,
        )
        assert triggered.returncode == 0, (
            triggered.stdout[-3000:] + triggered.stderr[-3000:] + (tmp_path / "serve.log").read_text()[-3000:]
        )

        # A config given for the existing run that differs from its own is refused, field by field, in the
        # UI's words (its parameters), not the CLI's flags.
        other = yaml.safe_load((run / "config.yaml").read_text())
        other["e_step"]["beta"], other["data"]["num_prompts"] = 0.3, 360
        (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
        refused = prefect_server.prefect(
            "deployment",
            "run",
            "coevolve/tiny-loop",
            "--param",
            f"config={tmp_path / 'other.yaml'}",
            "--watch",
            "--watch-timeout",
            "120",
            timeout=180,
        )
    assert rundir.is_done(run, last, "m-step")
    flow_run = next(line.split()[-1] for line in triggered.stdout.splitlines() if "UUID:" in line)
    refused_run = next(line.split()[-1] for line in refused.stdout.splitlines() if "UUID:" in line)
    with client(prefect_server) as c:
        nested = flow_runs_under(c, flow_run)
        limit = c.read_global_concurrency_limit_by_name("gpus-test")
        refusal = c.read_flow_run(refused_run).state
    # The one unfinished step ran as a job of the step deployment, nested under the run.
    assert f"run-iter{last}-m-step" in {r.name for r in nested}
    assert all(r.state.is_completed() for r in nested)
    assert limit.active_slots == 0
    events = prefect_server.post(
        "/events/filter", {"filter": {"event": {"name": ["prefect.concurrency-limit.acquired"]}}}
    )["events"]
    assert any(e["resource"]["prefect.resource.name"] == "gpus-test" for e in events)

    assert refused.returncode != 0 and refusal.is_failed()
    for words in (
        "e_step.beta (0.1 in the run, 0.3 given)",
        "data.num_prompts (120 in the run, 360 given)",
        "the config parameter",
        "leave config empty",
        "a new run_dir",
    ):
        assert words in refusal.message, (words, refusal.message)
    assert "--" not in refusal.message.split("differs from it in")[1], refusal.message
    assert yaml.safe_load((run / "config.yaml").read_text())["e_step"]["beta"] == 0.1

    # The schedules were declared (config and --cron), so a restart registers them again, as they were.
    assert schedules == [("cron", "0 0 1 1 *", True), ("interval", 31536000.0, True)]
    with serving(prefect_server, tmp_path / "serve-again.log", str(TINY), declared, str(run), **served):
        with client(prefect_server) as c:
            assert declared_schedules(c.read_deployment_by_name("coevolve/tiny-loop")) == schedules


def declared_schedules(deployment) -> list[tuple]:
    """A deployment's schedules as (kind, cron line or seconds, active)."""
    return sorted(
        ("cron", s.schedule.cron, s.active)
        if hasattr(s.schedule, "cron")
        else ("interval", s.schedule.interval.total_seconds(), s.active)
        for s in deployment.schedules
    )


WAIT_FOR_SLOT = """
from prefect import flow, get_run_logger
from coevolve.flows.steps import gpu_slots

@flow
def needs_a_gpu():
    with gpu_slots("gpus-busy", 1, get_run_logger()):
        get_run_logger().info("holding the GPU slot")

needs_a_gpu()
"""


def test_a_step_waiting_for_a_gpu_slot_says_so(prefect_server, tmp_path):
    with client(prefect_server) as c:
        c.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="gpus-busy", limit=1, active_slots=1))
    proc = subprocess.Popen(
        [sys.executable, "-c", WAIT_FOR_SLOT],
        env=prefect_server.env(),
        stdout=open(tmp_path / "wait.log", "w"),
        stderr=subprocess.STDOUT,
    )
    try:
        with client(prefect_server) as c:
            deadline = time.monotonic() + 120

            def said(words: str) -> bool:
                return any(words in log.message for log in c.read_logs(limit=200, sort=LogSort.TIMESTAMP_DESC))

            while not said("waiting for a GPU slot: limit gpus-busy has 1 of 1 taken, this step needs 1"):
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "wait.log").read_text()[-3000:]
                time.sleep(0.5)
            # Still waiting: the slot is taken.
            time.sleep(2)
            assert proc.poll() is None and not said("holding the GPU slot")
            c.update_global_concurrency_limit("gpus-busy", GlobalConcurrencyLimitUpdate(active_slots=0))
            assert proc.wait(timeout=120) == 0, (tmp_path / "wait.log").read_text()[-3000:]
            assert said("holding the GPU slot")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_flow_run_page_and_iteration_summary_in_chromium(prefect_server, reference_run, tmp_path):
    """What a user sees: the flow run's page, the last iteration's summary artifact and the run's report,
    in a headless Chromium; the screenshots land in test-artifacts/ (docs/ has small copies)."""
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is missing: `apt-get install -y chromium` (make test does it)"
    run, flow_run = reference_run
    last = step_plan(load_config(None, [], run))[-1][0]
    with client(prefect_server) as c:
        name = c.read_flow_run(flow_run).name
        artifact = next(
            a
            for a in c.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run])))
            if a.key == f"run-iteration-{last}"
        )
    ARTIFACTS.mkdir(exist_ok=True)
    # This machine has no network: nothing in the browser may try to reach one.
    flags = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--virtual-time-budget=8000",
        "--window-size=1400,1000",
    ]

    def look(url: str, png: str) -> str:
        (ARTIFACTS / png).unlink(missing_ok=True)
        dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
        subprocess.run(
            [chromium, *flags, f"--screenshot={ARTIFACTS / png}", url], capture_output=True, text=True, timeout=120
        )
        assert (ARTIFACTS / png).stat().st_size > 10_000, dom.stderr[-2000:]
        return dom.stdout

    page = look(f"{prefect_server.url}/runs/flow-run/{flow_run}", "prefect-flow-run.png")
    assert name in page
    # The summary as the UI renders its markdown: the headline numbers, the stop decision, the report.
    summary = look(f"{prefect_server.url}/artifacts/artifact/{artifact.id}", "prefect-iteration-summary.png")
    gold = rundir.read_done(run, last, "evaluate")["metrics"]["eval/gold_mean"]
    m = rundir.read_done(run, last, "m-step")["metrics"]
    assert f"Iteration {last} of run" in summary
    assert re.search(rf"gold reward\s*</td>\s*<td[^>]*>\s*{re.escape(f'{gold:.4g}')}\s*<", summary), summary[-3000:]
    assert f"{m['pseudo/kept']} kept, {m['pseudo/dropped']} dropped" in summary
    assert str((run / "report" / "index.html").resolve()) in summary
    report = look((run / "report" / "index.html").resolve().as_uri(), "report.png")
    assert "Responses side by side" in report
