"""Step command lines per launcher, and a child process whose lines stream as they come."""
import os
import sys
import time
from pathlib import Path

import pytest

from coevolve.core.config import load_config
from coevolve.core.launch import StepFailed, retries, run_process, step_command

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
RUN = Path("/runs/r")


def cfg(*overrides):
    return load_config(TINY, list(overrides))


def test_python_launcher_is_the_step_command():
    assert step_command(cfg(), "e-step", RUN, 1) == [sys.executable, "-m", "coevolve", "step", "e-step", "--run-dir", "/runs/r", "--iteration", "1"]


def test_accelerate_launches_training_steps_on_n_gpus():
    cmd = step_command(cfg("launch.launcher=accelerate", "launch.gpus=4"), "m-step", RUN, 2)
    assert cmd[:7] == [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "4", "--multi_gpu", "-m"]
    assert cmd[7:] == ["coevolve", "step", "m-step", "--run-dir", "/runs/r", "--iteration", "2"]


def test_accelerate_with_deepspeed_config():
    cmd = step_command(cfg("launch.launcher=accelerate", "launch.gpus=8", "launch.deepspeed_config=ds.json"), "e-step", RUN, 1)
    assert cmd[3:9] == ["--num_processes", "8", "--use_deepspeed", "--deepspeed_config_file", "ds.json", "-m"]


def test_deepspeed_launcher_runs_the_module():
    cmd = step_command(cfg("launch.launcher=deepspeed", "launch.gpus=2"), "sft-warmup", RUN, 0)
    assert cmd[:7] == [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--module", "coevolve"]


@pytest.mark.parametrize("step", ["init", "revise", "evaluate"])
def test_steps_that_train_nothing_run_as_one_process(step):
    assert step_command(cfg("launch.launcher=accelerate", "launch.gpus=4"), step, RUN, 1)[:4] == [sys.executable, "-m", "coevolve", "step"]


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


def test_a_preloaded_step_is_forked_with_its_output_and_exit_code(tmp_path):
    cmd = [sys.executable, "-m", "coevolve", "step", "bogus", "--run-dir", str(tmp_path), "--iteration", "0"]
    plain = run_process(cmd, lambda line: None)
    forked = run_process(cmd, lambda line: None, preload=True)
    assert forked == plain and plain[0] == 2
    assert any("no config: give --config FILE" in line for line in forked[1])


def test_an_interrupted_caller_leaves_no_child_behind():
    pids = []

    def stop(line):
        pids.append(int(line))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_process([sys.executable, "-c", "import os, time; print(os.getpid()); time.sleep(60)"], stop)
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)
