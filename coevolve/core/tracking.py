"""W&B tracking of one step process: one W&B run per step, grouped by the coevolve run, with the
step's phase metrics and wall times, TRL's training curves, distributions of its output datasets, and
its inputs and outputs as artifacts that reference the run directory.

Mode: `tracking.mode` in the config, else WANDB_MODE, else online when a W&B login exists and offline
when none does. Files land in RUN/wandb/ (`wandb sync RUN/wandb/offline-run-*` uploads offline ones).

Identity: the group is the run directory's, `{run_name}-{id}` with a short id made by the first
tracked step and kept in RUN/.wandb-id, so two runs from one config never share a group, run names
or artifact names. Every attempt at a step is the same W&B run (its id is the run directory's id,
iteration and step; `resume="allow"`): an attempt that fails closes it with exit code 1, and the
attempt that resumes it says so (tag `resumed`) and logs the phases it finds done again from their
records, so the attempt that finishes holds the whole step, even where offline runs sync apart.

wandb prints nothing on the console (its banners and its offline summary drowned the steps' own
lines): where the run's files are goes to the step's log.

Lineage: an artifact is named after the step output it references
(`tiny-3f9c01ab-policy-iter_1-e-step`), and its version is the digest of the files, so a consumer
that declares an input with the same files lands on the producer's version; an input whose producer
was never tracked is logged then. Inputs are also named in the run's config (`step.inputs`).

A table shows the first rows of each output dataset of responses (the e-step's samples, evaluate's
responses) with their RM score, and their gold score where the run has a sandbox task.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import re
import secrets
from pathlib import Path
from statistics import mean, pstdev
from urllib.parse import urlsplit

from coevolve.core import distributed

log = logging.getLogger("coevolve")
_run = None  # this process's W&B run: a step process runs one step

MODEL_KEYS = {"policy", "rm", "reviser"}
# Dataset columns whose distributions are logged as histograms (plus the chosen - rejected margin).
DIST_COLUMNS = ("score", "num_tokens", "chosen_score", "rejected_score", "chosen_tokens", "rejected_tokens")
ID_FILE = ".wandb-id"
# Rows of an output dataset of responses shown as a table: enough to read, not the whole dataset.
TABLE_ROWS = 64


def resolve_mode(cfg) -> str:
    chosen = cfg.tracking.mode or os.environ.get("WANDB_MODE")
    if chosen:
        return chosen
    return "online" if _logged_in() else "offline"


def _logged_in() -> bool:
    """Whether W&B credentials exist (the env key, an identity token, or the netrc entry that
    `wandb login` writes); the key itself is never read into our hands."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def active() -> bool:
    return _run is not None


def start(step) -> None:
    """Start the step's W&B run and log what earlier attempts at the step already finished."""
    global _run
    cfg = step.cfg
    mode = resolve_mode(cfg)
    # Under a multi-GPU launcher every process runs the step; only the main one reports.
    if mode == "disabled" or not distributed.is_main():
        return
    # TRL's WandbCallback logs into this run; it must not upload checkpoints (GBs) of its own.
    os.environ["WANDB_LOG_MODEL"] = "false"
    import wandb

    # Its own banners, summary and notices go to the step's log; the console is the steps' own. Run
    # settings silence the run's header and footer only; module-wide messages (artifact checksums,
    # warnings) follow `termsetup` (in wandb's __all__, undocumented: hence the pin below 0.32), set
    # after `setup`, which would otherwise set it again from the environment.
    wandb.setup()
    wandb.termsetup(wandb.Settings(silent=True), _StepLog(step))
    k = step.iteration
    dir_id = make_dir_id(step.run_dir)
    group = group_name(cfg, step.run_dir)
    config = {
        **cfg.model_dump(mode="json"),
        "step": {"name": step.name, "iteration": k, "run_dir": str(step.run_dir.resolve())},
    }
    _run = wandb.init(
        project=cfg.tracking.project,
        group=group,
        job_type=step.name,
        name=f"{group}-iter{k}-{step.name}",
        id=f"{dir_id}-iter{k}-{step.name}",
        resume="allow",
        config=config,
        tags=[f"iter{k}"] + ["resumed"] * bool(step.timings),
        dir=step.run_dir,
        mode=mode,  # type: ignore[arg-type]  # WANDB_MODE's spelling is wandb's to check
        reinit="finish_previous",
        settings=wandb.Settings(silent=True),
    )
    step.note(f"W&B run {_run.id} ({mode}): {_run.sync_dir}")
    if not _run.offline:
        # The one line of wandb's worth a place on the console: where to watch the step.
        log.info(f"W&B: {_run.url}")
    if step.timings:
        _run.summary["resumed_after"] = sorted(step.timings)
        _log(step.metrics, step.timings, step.io)


def where() -> dict | None:
    """Where the step's W&B run can be seen, for its DONE.json (the flow's iteration summary links it)."""
    if _run is None:
        return None
    return {"run": _run.name, "group": _run.group, **({"dir": _run.sync_dir} if _run.offline else {"url": _run.url})}


def log_phase(name: str, metrics: dict, seconds: float, io: dict) -> None:
    if _run is not None:
        _log(metrics, {name: seconds}, {name: io})


def _log(metrics: dict, timings: dict[str, float], io: dict[str, dict]) -> None:
    flat = _flatten({**metrics, "io": io})
    numbers = {k: v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    _run.log({**numbers, **{f"time/{phase}": s for phase, s in timings.items()}})
    # Labels and flags (the selected checkpoint, whether the loop stops) have no curve to draw.
    _run.summary.update({k: v for k, v in flat.items() if k not in numbers})


def _flatten(metrics: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def finish(step, done: dict) -> None:
    """Declare the finished step's inputs and log its outputs, with distributions of output datasets."""
    if _run is None:
        return
    _run.summary["time/total"] = sum(done["timings"].values())
    inputs = {role: artifact_name(step.cfg, step.run_dir, rel) for role, rel in done["inputs"].items()}
    _run.config.update({"step": {**_run.config["step"], "inputs": inputs}}, allow_val_change=True)
    for rel in set(done["inputs"].values()):
        if _run.offline:
            # wandb refuses use_artifact offline; this writes the record that use_artifact itself
            # writes for a new artifact: on `wandb sync` it is committed (onto the producer's version,
            # same digest) and marked as this run's input.
            _run._log_artifact(_artifact(step, rel), is_user_created=True, use_after_commit=True)
        else:
            _run.use_artifact(_artifact(step, rel))
    # One artifact per path, however many keys name it.
    for rel in dict.fromkeys(done["outputs"].values()):
        _run.log_artifact(_artifact(step, rel))
        if (step.run_dir / rel / "dataset_info.json").exists():
            _log_distributions(output_key(step.run_dir, rel), step.run_dir / rel)
            _log_responses(step.cfg, output_key(step.run_dir, rel), step.run_dir / rel)


def end(failed: bool) -> None:
    global _run
    if _run is not None:
        import wandb

        _run.finish(exit_code=1 if failed else 0)
        _run = None
        # The step's log closes with the step.
        wandb.termsetup(wandb.Settings(silent=True), None)


class _StepLog:
    """wandb's fallback logger in silent mode: its messages as lines of the step's log."""

    def __init__(self, step):
        self.step = step

    def info(self, msg: str) -> None:
        self.step.note(msg)

    def warning(self, msg: str) -> None:
        self.step.note(msg, logging.WARNING)

    def error(self, msg: str) -> None:
        self.step.note(msg, logging.ERROR)


def output_key(run_dir: Path, rel: str) -> str:
    """The key under which the producing step's DONE.json lists this path, so that every consumer
    names an artifact as its producer did (the m-step's `policy_new` is the e-step's `policy`)."""
    done = Path(run_dir, *Path(rel).parts[:2], "DONE.json")
    outputs = json.loads(done.read_text())["outputs"] if done.exists() else {}
    return next((key for key, path in outputs.items() if path == rel), Path(rel).name)


def make_dir_id(run_dir: Path) -> str:
    """The run directory's short id, made by the first tracked step and never changed after."""
    path = Path(run_dir) / ID_FILE
    if not path.exists():
        tmp = path.with_name(f"{ID_FILE}.{os.getpid()}")
        tmp.write_text(secrets.token_hex(4) + "\n")
        try:
            # A link fails where the file exists: of two steps racing, the first one's id stands.
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return read_dir_id(run_dir)


def read_dir_id(run_dir: Path) -> str:
    return (Path(run_dir) / ID_FILE).read_text().strip()


def group_name(cfg, run_dir: Path) -> str:
    return re.sub(r"[^\w.-]", "_", f"{cfg.run_name}-{read_dir_id(run_dir)}")


def artifact_name(cfg, run_dir: Path, rel: str) -> str:
    iteration, step = Path(rel).parts[:2]
    return re.sub(r"[^\w.-]", "_", f"{group_name(cfg, run_dir)}-{output_key(run_dir, rel)}-{iteration}-{step}")


def _artifact(step, rel: str):
    import wandb

    path = (step.run_dir / rel).resolve()
    kind = "model" if output_key(step.run_dir, rel) in MODEL_KEYS else "dataset"
    artifact = wandb.Artifact(
        artifact_name(step.cfg, step.run_dir, rel),
        type=kind,
        metadata={"path": rel, "run_dir": str(step.run_dir.resolve())},
    )
    if step.cfg.tracking.upload:
        # Outputs never change once their step is done, so wandb need not copy them before uploading.
        artifact.add_dir(str(path), policy="immutable")
    else:
        artifact.add_reference(path.as_uri())
    return artifact


def _log_distributions(key: str, path: Path) -> None:
    import datasets
    import wandb

    ds = datasets.load_from_disk(str(path))
    columns = {c: ds[c] for c in DIST_COLUMNS if c in ds.column_names}
    if "chosen_score" in columns and "rejected_score" in columns:
        columns["margin"] = [c - r for c, r in zip(columns["chosen_score"], columns["rejected_score"])]
    logged = {f"dist/{key}/rows": len(ds)}
    for name, values in columns.items():
        # Original pairs in a training mix carry no RM scores (NaN).
        values = [float(v) for v in values if not math.isnan(v)]
        if values:
            logged[f"dist/{key}/{name}"] = wandb.Histogram(values)
            logged[f"dist/{key}/{name}_mean"] = mean(values)
            logged[f"dist/{key}/{name}_std"] = pstdev(values)
    _run.log(logged)


def _log_responses(cfg, key: str, path: Path) -> None:
    """The first rows of a dataset of responses as a table, with their RM score and, in a sandbox
    task's run, their gold score: what the policy writes, beside what the curves say of it."""
    import datasets
    import wandb

    ds = datasets.load_from_disk(str(path))
    if not {"prompt", "response"} <= set(ds.column_names):
        return
    rows = ds.select(range(min(TABLE_ROWS, len(ds))))
    rm_score = next((c for c in ("score", "rm_score") if c in ds.column_names), None)
    columns = {"prompt": rows["prompt"], "response": rows["response"]}
    if rm_score:
        columns["rm_score"] = rows[rm_score]
    if cfg.data.task:
        from coevolve.data.tasks import load_task

        task = load_task(cfg.data.task)
        columns["gold"] = [task.gold(p, r) for p, r in zip(rows["prompt"], rows["response"])]
    if "model" in ds.column_names:
        columns["model"] = rows["model"]
    _run.log(
        {f"responses/{key}": wandb.Table(columns=list(columns), data=[list(row) for row in zip(*columns.values())])}
    )
