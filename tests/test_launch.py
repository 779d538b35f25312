"""Step command lines per launcher, and a child process whose lines stream as they come."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from coevolve.core import runlock
from coevolve.core.config import LaunchConfig, load_config
from coevolve.core.launch import StepFailed, retries, run_process, step_command
from coevolve.core.quiet import VERBOSE_ENV
from coevolve.core.stepserver import ForkedStep, list_servers, runtime_dir, server_key, stop_servers

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
RUN = Path("/runs/r")


def cfg(*overrides):
    return load_config(TINY, list(overrides))


def test_python_launcher_is_the_step_command():
    assert step_command(cfg(), "e-step", RUN, 1) == [
        sys.executable,
        "-m",
        "coevolve",
        "step",
        "e-step",
        "--run-dir",
        "/runs/r",
        "--iteration",
        "1",
    ]


def test_accelerate_launches_training_steps_on_n_gpus():
    cmd = step_command(cfg("launch.launcher=accelerate", "launch.gpus=4"), "m-step", RUN, 2)
    assert cmd[:7] == [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "4", "--multi_gpu", "-m"]
    assert cmd[7:] == ["coevolve", "step", "m-step", "--run-dir", "/runs/r", "--iteration", "2"]


def test_accelerate_with_deepspeed_config():
    cmd = step_command(
        cfg("launch.launcher=accelerate", "launch.gpus=8", "launch.deepspeed_config=ds.json"), "e-step", RUN, 1
    )
    assert cmd[3:9] == ["--num_processes", "8", "--use_deepspeed", "--deepspeed_config_file", "ds.json", "-m"]


def test_deepspeed_launcher_runs_the_module():
    cmd = step_command(cfg("launch.launcher=deepspeed", "launch.gpus=2"), "sft-warmup", RUN, 0)
    assert cmd[:7] == [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--module", "coevolve"]


@pytest.mark.parametrize("step", ["init", "revise", "evaluate"])
def test_steps_that_train_nothing_run_as_one_process(step):
    assert step_command(cfg("launch.launcher=accelerate", "launch.gpus=4"), step, RUN, 1)[:4] == [
        sys.executable,
        "-m",
        "coevolve",
        "step",
    ]


def test_retries_default_to_zero_for_training_and_one_for_generation():
    c = cfg()
    assert [retries(c, s) for s in ("e-step", "m-step", "revise", "evaluate")] == [0, 0, 1, 1]
    assert retries(cfg("retries.training=2"), "e-step") == 2


def test_lines_stream_while_the_process_runs():
    # Were the child's output buffered, all three lines would arrive together when it exits.
    script = "import sys, time; print('one'); print('err', file=sys.stderr); time.sleep(1.0); print('two')"
    seen = []
    start = time.monotonic()
    code, tail = run_process([sys.executable, "-c", script], lambda line: seen.append((line, time.monotonic() - start)))
    assert code == 0
    assert [line for line, _ in seen] == ["one", "err", "two"] == tail
    assert seen[0][1] < seen[2][1] - 0.5


def test_a_failing_process_reports_its_last_lines():
    script = "import sys\nfor i in range(50): print(i)\nsys.exit('boom')"
    code, tail = run_process([sys.executable, "-c", script], lambda line: None, tail=5)
    assert code == 1
    assert tail == ["46", "47", "48", "49", "boom"]
    message = str(StepFailed("e-step", 1, code, tail))
    assert message.startswith("step e-step (iteration 1) exited with code 1") and message.endswith("49\nboom")


@pytest.mark.integration
def test_a_preloaded_step_is_forked_with_its_output_and_exit_code(tmp_path, step_servers):
    cmd = [sys.executable, "-m", "coevolve", "step", "bogus", "--run-dir", str(tmp_path), "--iteration", "0"]
    plain = run_process(cmd, lambda line: None)
    forked = run_process(cmd, lambda line: None, launch=LaunchConfig())
    assert forked == plain and plain[0] == 2
    assert any("no config: give --config FILE" in line for line in forked[1])
    # The server stays up for the next step, of this run or of another, even after a broken request.
    servers = {f: f.read_text() for f in step_servers.glob("*.pid")}
    for junk in (b"", b"not a request"):
        with socket.socket(socket.AF_UNIX) as bad:
            bad.connect(str(next(step_servers.glob("*.sock"))))
            bad.sendall(junk)
    again = run_process(cmd, lambda line: None, launch=LaunchConfig())
    assert again == forked
    assert {f: f.read_text() for f in step_servers.glob("*.pid")} == servers != {}


@pytest.mark.integration
def test_a_server_gone_before_it_forked_the_step_is_replaced(tmp_path):
    # As a server ending on idle does: the client's connection waits in the backlog, then the socket
    # is unlinked and the listener closed, and the step never started.
    env = {**os.environ, "COEVOLVE_RUNTIME_DIR": str(tmp_path / "servers")}
    path = runtime_dir(env) / f"{server_key(env)}.sock"
    ending = socket.socket(socket.AF_UNIX)
    ending.bind(str(path))
    ending.listen(1)

    def end_once_the_client_waits():
        time.sleep(1)
        path.unlink()
        ending.close()

    threading.Thread(target=end_once_the_client_waits).start()
    step = ForkedStep(["step", "bogus", "--run-dir", str(tmp_path), "--iteration", "0"], env, 60, 3)
    try:
        assert "no config: give --config FILE" in step.stdout.read() and step.wait(60) == 2
        assert len(list_servers(tmp_path / "servers")) == 1
    finally:
        stop_servers(tmp_path / "servers")


@pytest.mark.integration
def test_servers_are_listed_and_stopped_from_the_cli(tmp_path):
    env = {**os.environ, "COEVOLVE_RUNTIME_DIR": str(tmp_path / "servers")}
    cmd = [sys.executable, "-m", "coevolve", "step", "bogus", "--run-dir", str(tmp_path), "--iteration", "0"]
    assert run_process(cmd, lambda line: None, env=env, launch=LaunchConfig())[0] == 2
    pid = int(next((tmp_path / "servers").glob("*.pid")).read_text())
    listed = subprocess.run(
        [sys.executable, "-m", "coevolve", "servers"], env=env, capture_output=True, text=True, check=True
    )
    assert listed.stdout.startswith(f"step server {pid}  log: ")
    subprocess.run([sys.executable, "-m", "coevolve", "servers", "--stop"], env=env, check=True)
    deadline = time.monotonic() + 10
    while list((tmp_path / "servers").glob("*.sock")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list((tmp_path / "servers").glob("*.sock")) and not list((tmp_path / "servers").glob("*.pid"))
    assert (
        subprocess.run([sys.executable, "-m", "coevolve", "servers"], env=env, capture_output=True, text=True).stdout
        == ""
    )


def test_a_step_server_is_keyed_by_the_variables_its_imports_read():
    env = dict(os.environ)
    for unrelated in ("PYTEST_CURRENT_TEST", "PREFECT__FLOW_RUN_ID", "COEVOLVE_RUN_LOCK", "SOME_SHELLS_OWN"):
        assert server_key({**env, unrelated: "another value"}) == server_key(env), unrelated
    for read in (
        "HF_HUB_OFFLINE",
        "CUDA_VISIBLE_DEVICES",
        "OMP_NUM_THREADS",
        "PYTHONPATH",
        "TORCHINDUCTOR_CACHE_DIR",
        "WANDB_MODE",
    ):
        assert server_key({**env, read: "another value"}) != server_key(env), read


@pytest.mark.integration
def test_clients_differing_in_other_variables_share_a_server_and_keep_their_own(tmp_path):
    # Two flow runs' steps: another PREFECT__FLOW_RUN_ID each, and another run lock token. The step
    # holding the run's token runs under its lock (to the missing config); the other finds the run in use.
    folder = tmp_path / "servers"
    run = tmp_path / "run"
    base = {**os.environ, "COEVOLVE_RUNTIME_DIR": str(folder), "PYTHONUNBUFFERED": "1"}
    argv = ["step", "bogus", "--run-dir", str(run), "--iteration", "0"]
    try:
        with runlock.held(run, "test"):
            outputs = []
            for flow_run, token in (("run-a", os.environ[runlock.LOCK_ENV]), ("run-b", "not-the-token")):
                step = ForkedStep(argv, {**base, "PREFECT__FLOW_RUN_ID": flow_run, runlock.LOCK_ENV: token}, 60, 3)
                outputs.append((step.stdout.read(), step.wait(60)))
                step.stdout.close()
        assert "no config: give --config FILE" in outputs[0][0] and outputs[0][1] == 2
        assert f"in use by pid {os.getpid()}" in outputs[1][0] and outputs[1][1] == 2
        assert len(list_servers(folder)) == 1
        # A variable the imports read gets a server of its own.
        step = ForkedStep(argv, {**base, "OMP_NUM_THREADS": "2" if base.get("OMP_NUM_THREADS") != "2" else "1"}, 60, 3)
        step.stdout.read(), step.wait(60), step.stdout.close()
        assert len(list_servers(folder)) == 2
    finally:
        stop_servers(folder)


def test_a_step_server_listens_only_in_a_folder_closed_to_others(tmp_path):
    open_folder = tmp_path / "open"
    open_folder.mkdir(mode=0o755)
    open_folder.chmod(0o755)
    with pytest.raises(RuntimeError, match="closed to others"):
        runtime_dir({"COEVOLVE_RUNTIME_DIR": str(open_folder)})
    assert runtime_dir({"COEVOLVE_RUNTIME_DIR": str(tmp_path / "new")}).stat().st_mode & 0o777 == 0o700


def test_a_step_server_folder_too_deep_for_its_sockets_is_refused_in_one_line(tmp_path):
    # A Unix socket's path is at most 107 characters: past that the server died at start with
    # "AF_UNIX path too long" in its own log, and every step of the run failed on it.
    deep = tmp_path / ("d" * (120 - len(str(tmp_path))))
    with pytest.raises(
        RuntimeError, match=r"too long for the step servers' sockets .* set COEVOLVE_RUNTIME_DIR"
    ) as err:
        runtime_dir({"COEVOLVE_RUNTIME_DIR": str(deep)})
    assert str(deep) in str(err.value) and "\n" not in str(err.value)
    assert not deep.exists()  # refused before anything is made


def test_a_killed_client_takes_its_forked_step_with_it(fresh_run):
    # The client forks a real e-step, says its pid, and is killed with no chance to clean up. A process
    # of its own holds the step's output open: the step must not end merely by writing to a closed pipe.
    client = (
        "import os, subprocess\nfrom coevolve.core.stepserver import ForkedStep\n"
        f"step = ForkedStep(['step', 'e-step', '--run-dir', {str(fresh_run)!r}, '--iteration', '1'], {{**os.environ, 'PYTHONUNBUFFERED': '1'}}, 60, 3)\n"
        "holder = subprocess.Popen(['sleep', '60'], pass_fds=[step.stdout.fileno()])\n"
        "print(step.pid, holder.pid, flush=True)\nfor line in step.stdout: pass\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", client], stdout=subprocess.PIPE, text=True)
    pid, holder = map(int, proc.stdout.readline().split())
    time.sleep(1.0)
    os.kill(pid, 0)  # the step is running
    proc.kill()
    proc.wait()
    try:
        assert _ends_within(pid, 20), f"step {pid} still runs after its client was killed"
    finally:
        os.kill(holder, signal.SIGKILL)
    assert not (fresh_run / "iter_1" / "e-step" / "DONE.json").exists()


def test_an_interrupted_caller_leaves_no_child_behind():
    pids = []

    def stop(line):
        pids.append(int(line))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_process([sys.executable, "-c", "import os, time; print(os.getpid()); time.sleep(60)"], stop)
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)


def _ends_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.integration
def test_servers_stop_stops_only_this_checkouts_servers(tmp_path):
    from coevolve.core.stepserver import code_location

    folder = tmp_path / "servers"
    folder.mkdir(mode=0o700)
    sleepers = {}
    for key, code in (("ours", code_location()), ("theirs", "/elsewhere/checkout/coevolve")):
        sleepers[key] = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        (folder / f"{key}.pid").write_text(str(sleepers[key].pid))
        (folder / f"{key}.code").write_text(code)
    try:
        env = {**os.environ, "COEVOLVE_RUNTIME_DIR": str(folder)}
        listed = subprocess.run(
            [sys.executable, "-m", "coevolve", "servers"], env=env, capture_output=True, text=True, check=True
        ).stdout
        assert "/elsewhere/checkout/coevolve" in listed and code_location() in listed
        subprocess.run([sys.executable, "-m", "coevolve", "servers", "--stop"], env=env, check=True)
        assert sleepers["ours"].wait(timeout=10) != 0
        assert sleepers["theirs"].poll() is None
        subprocess.run([sys.executable, "-m", "coevolve", "servers", "--stop", "--all"], env=env, check=True)
        assert sleepers["theirs"].wait(timeout=10) != 0
    finally:
        for proc in sleepers.values():
            proc.kill()
            proc.wait()


@pytest.mark.integration
def test_at_most_max_servers_live_and_the_longest_idle_stops_first(tmp_path):
    folder = tmp_path / "servers"
    base = {**os.environ, "COEVOLVE_RUNTIME_DIR": str(folder), "PYTHONUNBUFFERED": "1"}
    argv = ["step", "bogus", "--run-dir", str(tmp_path / "run"), "--iteration", "0"]
    pids = []
    try:
        for threads in ("1", "2", "3"):  # a server each
            env = {**base, "OMP_NUM_THREADS": threads}
            step = ForkedStep(argv, env, 60, 2)
            assert step.stdout.read() and step.wait(60) == 2
            step.stdout.close()
            pids.append(int((folder / f"{server_key(env)}.pid").read_text()))
        deadline = time.monotonic() + 10
        while len(list_servers(folder)) > 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sorted(pid for pid, _, _ in list_servers(folder)) == sorted(pids[1:])
        assert (
            "stopped: another was starting over launch.max_servers"
            in (folder / f"{server_key({**base, 'OMP_NUM_THREADS': '1'})}.log").read_text()
        )
    finally:
        stop_servers(folder)


@pytest.mark.integration
def test_a_server_running_a_step_is_not_stopped_for_the_cap(tmp_path):
    # The step waits on its config, a FIFO nobody writes: its server is busy while another one starts.
    folder = tmp_path / "servers"
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    base = {**os.environ, "COEVOLVE_RUNTIME_DIR": str(folder), "PYTHONUNBUFFERED": "1"}
    busy = ForkedStep(
        ["step", "init", "--run-dir", str(tmp_path / "run"), "--iteration", "0", "--config", str(fifo)],
        {**base, "OMP_NUM_THREADS": "1"},
        60,
        1,
    )
    try:
        other = ForkedStep(
            ["step", "bogus", "--run-dir", str(tmp_path / "run2"), "--iteration", "0"],
            {**base, "OMP_NUM_THREADS": "2"},
            60,
            1,
        )
        assert other.stdout.read() and other.wait(60) == 2
        other.stdout.close()
        assert busy.poll() is None and len(list_servers(folder)) == 2
    finally:
        busy.kill()
        busy.wait(30)
        busy.stdout.close()
        stop_servers(folder)


NOISE = ("`gradient_checkpointing` is deprecated", "Setting accelerator to CPU")


@pytest.mark.parametrize("verbose, forked", [(False, True), (True, True), (False, False), (True, False)])
def test_a_steps_output_has_no_known_third_party_noise_unless_verbose(fresh_run, verbose, forked):
    # rm-init builds a trl config (transformers' gradient_checkpointing FutureWarning) and imports
    # DeepSpeed (its "Setting accelerator to CPU" on a host without a GPU). A forked step is verbose as
    # `coevolve -v run` makes it, through its environment; a plain one by its own -v.
    argv = ["step", "rm-init", "--run-dir", str(fresh_run), "--iteration", "0", "--force"]
    env = {VERBOSE_ENV: "1"} if verbose and forked else {}
    cmd = [sys.executable, "-m", "coevolve", *(["-v"] if verbose and not forked else []), *argv]
    code, tail = run_process(cmd, lambda line: None, env=env, tail=100_000, launch=LaunchConfig(preload=forked))
    assert code == 0, tail[-20:]
    seen = {noise for noise in NOISE for line in tail if noise in line}
    assert seen == (set(NOISE) if verbose else set())


@pytest.mark.integration
def test_prefect_telemetry_is_off_for_the_flow_unless_the_user_set_it():
    # Its heartbeat, sent by the temporary server of `coevolve flow` without a Prefect server, fails on
    # that server's locked sqlite database with a ~130-line traceback.
    script = (
        "from coevolve.core.quiet import prefect_telemetry_off; prefect_telemetry_off()\n"
        "from prefect.settings import get_current_settings; print(get_current_settings().server.analytics_enabled)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_ANALYTICS_ENABLED"}
    for given, expected in ((None, "False"), ("true", "True")):
        run_env = env if given is None else {**env, "PREFECT_SERVER_ANALYTICS_ENABLED": given}
        out = subprocess.run(
            [sys.executable, "-c", script], env=run_env, capture_output=True, text=True, check=True
        ).stdout
        assert out.strip() == expected
