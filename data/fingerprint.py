"""The content of the data files init read, recorded in its DONE.json, so a file changed after init is
noticed: init is redone while nothing has used its outputs, and refused once later steps have. Without
it a fixed file was ignored, the run going on with what init had cached. Hub datasets are not hashed:
they would have to be downloaded to be compared."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

from coevolve.core import rundir
from coevolve.core.config import Config, ConfigError

log = logging.getLogger("coevolve")


def data_files(cfg: Config) -> dict[str, dict[str, str]]:
    """{role: {path, sha256}} for each of data.prompts/pairs/demos that is a local file or folder, and
    data.task when it is a spec file."""
    found = {}
    for role in ("prompts", "pairs", "demos"):
        source = getattr(cfg.data, role)
        if source is not None and Path(source.path).exists():
            found[role] = {"path": source.path, "sha256": _digest(Path(source.path))}
    # A task named by its spec file generates the data from it (a builtin name is part of the code).
    if cfg.data.task and Path(cfg.data.task).is_file():
        found["task"] = {"path": cfg.data.task, "sha256": _digest(Path(cfg.data.task))}
    return found


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if file.is_file():
            h.update(str(file.relative_to(path)).encode() + b"\0" if path.is_dir() else b"")
            with file.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def changed_since_init(run: Path, cfg: Config) -> list[str]:
    """The data files that changed since the finished init read them. A ConfigError names the first
    when a later step has finished: its outputs were made from the old content."""
    if not rundir.is_done(run, 0, "init"):
        return []
    recorded = rundir.read_done(run, 0, "init").get("data_files", {})
    now = data_files(cfg)
    changed = [now[role]["path"] for role in now if role in recorded and recorded[role] != now[role]]
    later = [f"iter_{k}/{step}" for k, step, _ in rundir.finished_steps(run) if (k, step) != (0, "init")]
    if changed and later:
        raise ConfigError(
            f"{changed[0]}: changed since init read it, and {later[0]} was made from the old content; "
            f"restore the file, or start a new --run-dir"
        )
    return changed


def init_is_stale(run: Path, cfg: Config) -> bool:
    """Whether init must be redone for changed data files; if so, the later steps' unfinished folders,
    built on the old data, are removed."""
    changed = changed_since_init(run, cfg)
    if changed:
        for partial in sorted(Path(run).glob("iter_*/.*.partial")):
            shutil.rmtree(partial)
        log.info(f"{', '.join(changed)}: changed since init read it; init is redone")
    return bool(changed)
