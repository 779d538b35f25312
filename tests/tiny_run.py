"""One tiny 2-iteration run (`coevolve run`, W&B offline, evaluated after every iteration) shared by the
tracking and report tests.

Imported by both test modules; the run is made once per session, the first time either asks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST

ROOT = Path(__file__).resolve().parents[1]
# A key of the real format, so a leak of it anywhere in the run directory can be found.
FAKE_KEY = "deadbeef" * 5
_made: dict[str, Path] = {}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    if "run" not in _made:
        run = tmp_path_factory.mktemp("tiny_run") / "run"
        env = {**os.environ, "WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY}
        cmd = [
            sys.executable,
            "-m",
            "coevolve",
            "run",
            "--config",
            str(ROOT / "configs" / "tiny.yaml"),
            "--run-dir",
            str(run),
            *FAST,
            "steps.evaluate=true",
        ]
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        (run / "coevolve-run.log").write_text(done.stdout + done.stderr)
        _made["run"] = run
    return _made["run"]
