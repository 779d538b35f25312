"""What a finished step was made from, and whether the run directory still describes it.

Each step's DONE.json records `provenance`: the values of the config fields the step's outputs depend
on (each step's `depends_on` in core/steps.py) and the `finished` stamp of every step it was built on (each
finished step before it, those that only measure (evaluate) excepted: nothing reads them). Values rather than a hash, so
that a change is named field by field, and a field the schema gains later (its default keeping the old
behaviour) changes nothing already made. A step is stale when either no longer holds: its fields
changed since (accepted with --redo or --force), or a step it was built on was redone. Stale steps are
redone by the next `coevolve run`, and no step starts from one."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from coevolve.core import rundir
from coevolve.core.rundir import RunDirError
from coevolve.core.steps import STEPS, position
from coevolve.core.terms import CLI, Terms

if TYPE_CHECKING:
    from coevolve.core.config import Config

log = logging.getLogger("coevolve")


def step_key(k: int, name: str) -> str:
    return f"iter_{k}/{name}"


# Fields inside a step's sections that change how fast it computes, not what: a compiled training runs
# the same steps through other kernels, as `device` and `generation` (in no step's list) do. Switching it
# on for the rest of a run leaves the finished steps as they are.
HOW_NOT_WHAT = ("compile",)


def fields(cfg: Config, name: str) -> dict:
    """The step's config fields by dotted name, as they read in config.yaml."""
    return {
        key: value
        for key, value in flat(cfg).items()
        if any(key == p or key.startswith(p + ".") for p in STEPS[name].depends_on)
        and key.rsplit(".", 1)[-1] not in HOW_NOT_WHAT
    }


def changed(made: dict, now: dict) -> list[str]:
    """Fields whose values differ. A field only one side has is a field the schema gained or lost, no
    change, unless the other side has fields under it (a section given where there was none, or gone)."""
    differ = {key for key in made.keys() & now.keys() if made[key] != now[key]}
    for key in made.keys() ^ now.keys():
        other = now if key in made else made
        if any(o.startswith(key + ".") for o in other):
            differ.add(key)
    return sorted(differ)


def built_on(run: Path, k: int, name: str) -> dict[str, str]:
    """The finished steps before (k, name), but those that only measure, by their `finished` stamps."""
    before = (k, position(name))
    return {
        step_key(i, s): done["finished"]
        for i, s, done in rundir.finished_steps(run)
        if (i, position(s)) < before and not STEPS[s].measures
    }


def record(run: Path, cfg: Config, k: int, name: str) -> dict:
    """The provenance a step started now would record in its DONE.json."""
    return {"config": fields(cfg, name), "built_on": built_on(run, k, name)}


def stale_because(run: Path, cfg: Config, k: int, name: str) -> str | None:
    """Why the finished step (k, name) no longer holds, or None. Steps finished before provenance was
    recorded are taken as they are."""
    made = rundir.read_done(run, k, name).get("provenance")
    if made is None:
        return None
    fields_changed = changed(made["config"], fields(cfg, name))
    if fields_changed:
        return f"made with other values of {', '.join(fields_changed)} than config.yaml holds now"
    # Every step now before it, as it was then: a step redone, gone, or run before it since (a step
    # switched on later, as steps.sft_warmup) changes what it would be built on.
    now = built_on(run, k, name)
    for key, finished in made["built_on"].items():
        if key not in now:
            return f"built on {key}, which is gone"
        if now[key] != finished:
            return f"built on {key} as it was before it was redone"
    added = [key for key in now if key not in made["built_on"]]
    if added:
        return f"made before {added[0]}, which it would be built on now"
    return None


def stale_after(run: Path, cfg: Config, k: int, name: str) -> list[str]:
    """The finished steps after (k, name) that are stale."""
    here = (k, position(name))
    return [
        step_key(i, s)
        for i, s, _ in rundir.finished_steps(run)
        if (i, position(s)) > here and stale_because(run, cfg, i, s)
    ]


def check_change(run: Path, old: Config, new: Config, redo: bool, terms: Terms = CLI) -> None:
    """Refuse a config change that alters fields finished steps were made from, naming the fields and the
    steps it would invalidate (those and every finished step built on them), unless `redo`."""
    named: dict[str, None] = {}  # the changed fields, in order
    affected: list[str] = []
    for k, name, done in rundir.finished_steps(run):
        mine = changed(fields(old, name), fields(new, name))
        built_on = done.get("provenance", {}).get("built_on")
        # A step finished before provenance was recorded counts as built on every step before it.
        on_affected = any(a in built_on for a in affected) if built_on is not None else bool(affected)
        if mine or on_affected:
            affected.append(step_key(k, name))
        named.update(dict.fromkeys(mine))
    if not affected:
        return
    names = ", ".join(named)
    if redo:
        log.info(f"{run}: {names} changed: {', '.join(affected)} are stale now, redone by `coevolve run`")
        return
    raise RunDirError(
        f"{run}: changing {names} would invalidate the finished steps {', '.join(affected)}; "
        f"{terms.redo}, or use {terms.run_dir}"
    )


def restart_if_changed(partial: Path, made: dict) -> None:
    """A step in progress resumes only from phases made from what it would be made from now."""
    path = partial / "provenance.json"
    begun = json.loads(path.read_text()) if path.exists() else made
    if begun["built_on"] != made["built_on"] or changed(begun["config"], made["config"]):
        log.info(f"{partial}: begun from other config fields or earlier steps than now; starting it over")
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(made))


def flat(cfg: Config) -> dict:
    """Every field of the config by dotted name, as config.yaml holds it."""
    return _flatten(cfg, cfg.model_dump(mode="json"))


def _flatten(model: BaseModel, tree: dict, prefix: str = "") -> dict:
    """Dotted names down to the schema's leaves; a free-form mapping (stores.replay, train.extra) is one
    value, so that a key it gains or loses is a change."""
    out = {}
    for key, value in tree.items():
        sub = getattr(model, key)
        if isinstance(sub, BaseModel):
            out.update(_flatten(sub, value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
