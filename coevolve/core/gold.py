"""The oracle RM: a sandbox task's gold reward r* standing where a trained RM would.

Its "checkpoint" is a folder holding only a marker file that names the task, so the run directory
contract (an `rm` output per step) holds, and every step that scores goes through `rollout.score`.
"""

from __future__ import annotations

import json
from pathlib import Path

GOLD_FILE = "gold_reward.json"


def write_gold_rm(out: Path, task: str) -> dict:
    out.mkdir(parents=True)
    (out / GOLD_FILE).write_text(json.dumps({"task": task}))
    return {"rm/gold_task": task}


def gold_task(rm: Path):
    """The task whose gold reward `rm` stands for, or None for a trained RM."""
    marker = Path(rm) / GOLD_FILE
    if not marker.exists():
        return None
    from coevolve.data.tasks import load_task

    return load_task(json.loads(marker.read_text())["task"])
