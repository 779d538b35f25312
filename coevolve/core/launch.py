"""How a step is started: the command line (plain Python, or a multi-GPU launcher from `cfg.launch`)
and a child process whose output is streamed line by line. Used by `coevolve run` and by the Prefect
flows alike, so both launch exactly what a user would type."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path

from coevolve.core.config import Config, LaunchConfig
from coevolve.core.steps import STEPS
from coevolve.core.stepserver import ForkedStep


class StepFailed(RuntimeError):
    """A step process exited non-zero. The message is its error line, then, when the step got as far as
    its log, the log's path and last lines (its own lines and the traceback, not the trainer's
    printouts that fill its output); else its last output lines."""

    def __init__(self, step: str, iteration: int, code: int, tail: list[str], log: Path | None = None, lines: int = 20):
        self.code = code
        self.tail = tail
        head = f"step {step} (iteration {iteration}) exited with code {code}"
        error = next(
            (line.removeprefix("coevolve: error: ") for line in reversed(tail) if line.startswith("coevolve: error: ")),
            None,
        )
        if log is not None and Path(log).exists():
            last = "\n".join(Path(log).read_text(errors="replace").splitlines()[-lines:])
            super().__init__(
                f"{head}: {error or (tail[-1] if tail else '(no output)')}\nits log: {log}; its last lines:\n{last}"
            )
        else:
            last = "\n".join(tail) or "(no output)"
            super().__init__(f"{head}" + (f": {error}" if error else "") + f"; its last lines:\n{last}")


def retries(cfg: Config, step: str) -> int:
    return getattr(cfg.retries, STEPS[step].retry)


def step_command(cfg: Config, step: str, run_dir: Path, iteration: int) -> list[str]:
    # The step reads its config from RUN/config.yaml, so the command carries no config of its own.
    step_args = ["coevolve", "step", step, "--run-dir", str(run_dir), "--iteration", str(iteration)]
    launch = cfg.launch
    # sys.executable rather than a script on PATH: the child runs in the same environment as its parent.
    if launch.launcher == "python" or not STEPS[step].trains:
        return [sys.executable, "-m", *step_args]
    if launch.launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(launch.gpus)]
        if launch.deepspeed_config:
            cmd += ["--use_deepspeed", "--deepspeed_config_file", launch.deepspeed_config]
        elif launch.gpus > 1:
            cmd += ["--multi_gpu"]
        return cmd + ["-m", *step_args]
    # deepspeed's launcher hands the config file to nobody; the step passes cfg.launch.deepspeed_config to
    # its trainer itself.
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(launch.gpus), "--module", *step_args]


def run_process(
    cmd: list[str],
    on_line: Callable[[str], None],
    env: dict[str, str] | None = None,
    tail: int = 30,
    launch: LaunchConfig | None = None,
) -> tuple[int, list[str]]:
    """Run `cmd` with stderr merged into stdout; every line goes to `on_line` as it arrives. Returns the
    exit code and the last `tail` lines. With `launch.preload`, a plain `python -m coevolve ...` command
    is forked from a step server that has imported the libraries already (core/stepserver.py)."""
    # Unbuffered, so a step's lines arrive while it runs, not when it exits.
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    last: deque[str] = deque(maxlen=tail)
    if launch is not None and launch.preload and cmd[:3] == [sys.executable, "-m", "coevolve"]:
        proc: ForkedStep | subprocess.Popen[str] = ForkedStep(
            cmd[3:], child_env, launch.server_idle_s, launch.max_servers
        )
    else:
        # The child stays in our process group: whoever kills this process's group (Prefect cancelling
        # a flow run does) kills the step too. A forked step is not in it, but ends with its client, which is.
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env, text=True, errors="replace", bufsize=1
        )
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            last.append(line)
            on_line(line)
        return proc.wait(), list(last)
    finally:
        # Reached with the child alive only when we are interrupted; never leave a step running unowned.
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
