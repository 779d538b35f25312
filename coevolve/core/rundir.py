"""The run directory contract (README: "The run directory"): where each step's outputs live, when a
step counts as finished, and which policy / RM is current before a given step."""

from __future__ import annotations

import json
from pathlib import Path

from coevolve.core.errors import InputError
from coevolve.core.steps import STEPS, position


class RunDirError(InputError):
    """The run directory refuses a command (in use, made from other config fields, steps missing);
    always one line naming the run directory and what is in the way."""


def iter_dir(run: Path, k: int) -> Path:
    return Path(run) / f"iter_{k}"


def step_dir(run: Path, k: int, step: str) -> Path:
    return iter_dir(run, k) / step


def partial_dir(run: Path, k: int, step: str) -> Path:
    return iter_dir(run, k) / f".{step}.partial"


def is_done(run: Path, k: int, step: str) -> bool:
    return (step_dir(run, k, step) / "DONE.json").exists()


def read_done(run: Path, k: int, step: str) -> dict:
    return json.loads((step_dir(run, k, step) / "DONE.json").read_text())


def finished_steps(run: Path) -> list[tuple[int, str, dict]]:
    """Every finished step, in run order."""
    found = []
    for done in Path(run).glob("iter_*/*/DONE.json"):
        k = int(done.parent.parent.name.split("_")[1])
        step = done.parent.name
        if step in STEPS:
            found.append((k, step, json.loads(done.read_text())))
    return sorted(found, key=lambda t: (t[0], position(t[1])))


def latest_output(
    run: Path, key: str, before: tuple[int, str] | None = None, iteration_max: int | None = None
) -> Path | None:
    """The `outputs[key]` of the latest finished step that precedes `before` (or of any step)."""
    limit = (before[0], position(before[1])) if before else None
    found = None
    for k, step, done in finished_steps(run):
        if limit is not None and (k, position(step)) >= limit:
            break
        if iteration_max is not None and k > iteration_max:
            break
        if key in done.get("outputs", {}):
            found = Path(run) / done["outputs"][key]
    return found


def require_output(run: Path, key: str, before: tuple[int, str]) -> Path:
    path = latest_output(run, key, before)
    if path is None:
        raise RunDirError(
            f"{run}: no finished step before iteration {before[0]} {before[1]} produced {key!r}; run `coevolve step init` first"
        )
    return path


def relative(run: Path, path: Path) -> str:
    return str(Path(path).resolve().relative_to(Path(run).resolve()))
