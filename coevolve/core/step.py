"""One step's life in the run directory: a `.partial` folder, phases that persist their outputs (so a
killed step resumes at its first unfinished phase), a full log, and `DONE.json` + rename when complete.

Under a multi-process launcher every process runs the step (core/distributed.py): the main one writes
the step folder and its log; the others build each phase into a scratch folder of their own, thrown
away, and all wait for the main one at the end of each phase, so each reads the phase's one output."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from coevolve.core import compile_cache, distributed, provenance, rundir, tracking
from coevolve.core.config import Config
from coevolve.core.errors import InputError
from coevolve.core.quiet import quiet_third_party

if TYPE_CHECKING:
    from coevolve.core.loaded import Loaded
    from coevolve.data.store import Store

log = logging.getLogger("coevolve")


def _now() -> str:
    # Milliseconds: the time between one step's end and the next one's start is a measured overhead.
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


class StepCrashed(RuntimeError):
    """A step failed on something other than bad input; its traceback is in the step's log."""


class Progress:
    """Items done, rate and time left for a long phase, printed at most every `every` seconds."""

    def __init__(self, label: str, total: int, every: float = 5.0):
        self.label, self.total, self.every = label, total, every
        self.start = self.last = time.perf_counter()

    def __call__(self, done: int, total: int | None = None) -> None:
        total = total or self.total
        now = time.perf_counter()
        if now - self.last < self.every and done < total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        left = (total - done) / rate if rate > 0 else float("inf")
        log.info(f"{self.label}: {done}/{total} ({rate:.1f}/s, {left:.0f}s left)")


class StepRun:
    """Use as: `with StepRun(run_dir, k, "e-step", cfg) as step: ...; step.finish(outputs=...)`."""

    def __init__(self, run_dir: Path, iteration: int, name: str, cfg: Config, force: bool = False):
        self.run_dir = Path(run_dir)
        self.iteration = iteration
        self.name = name
        self.cfg = cfg
        self.force = force
        self.final = rundir.step_dir(self.run_dir, iteration, name)
        self.dir = rundir.partial_dir(self.run_dir, iteration, name)
        self.metrics: dict = {}
        self.timings: dict = {}
        # Per phase: models and tokenizers loaded and saved, and the seconds it took (core/io_timing.py).
        self.io: dict = {}
        self.inputs: dict = {}
        # What the step module's `check` read before the step began, for its phases to reuse.
        self.checked: dict = {}
        self.started = _now()
        self._handler: logging.Handler | None = None
        # The models the step holds in memory (core/loaded.py), from __enter__ to __exit__.
        self.models: Loaded | None = None

    @property
    def already_done(self) -> bool:
        return rundir.is_done(self.run_dir, self.iteration, self.name) and not self.force

    def __enter__(self) -> StepRun:
        # Before anything compiles; under a multi-process launcher every process sets it for itself.
        compile_env = compile_cache.use(compile_cache.folder(self.cfg.launch.compile_cache))
        distributed.init()
        self.provenance = provenance.record(self.run_dir, self.cfg, self.iteration, self.name)
        if distributed.is_main():
            provenance.restart_if_changed(self.dir, self.provenance)
            (self.dir / "phases").mkdir(exist_ok=True)
            self._handler = logging.FileHandler(self.dir / "log.txt")
            self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(self._handler)
        else:
            # The main process reports progress for all; the others speak only of trouble.
            log.setLevel(logging.WARNING)
        distributed.barrier()
        for record in sorted((self.dir / "phases").glob("*.json")):
            saved = json.loads(record.read_text())
            self.metrics.update(saved["metrics"])
            self.timings[record.stem] = saved["seconds"]
            self.io[record.stem] = saved.get("io", {})  # phases finished before io was counted: none
        # The pid: a step forked from the step server has that server's command line, not its own.
        log.info(
            f"iteration {self.iteration} {self.name} (pid {os.getpid()}): working in {self.dir}"
            + (f" (resuming after {sorted(self.timings)})" if self.timings else "")
        )
        self.note(
            "torch.compile caches (launch.compile_cache): " + ", ".join(f"{k}={v}" for k, v in compile_env.items())
        )
        # Finished outputs never change: without this, datasets' map/filter would write cache files
        # into earlier steps' dataset folders (changing what their W&B artifacts' digests describe).
        import datasets
        import transformers

        datasets.disable_caching()
        # Per-shard progress bars of datasets/transformers drown the step's own progress lines.
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        from coevolve.core import loaded

        self.models = loaded.begin_step(self.cfg)
        tracking.start(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.models is not None:
            from coevolve.core import loaded

            loaded.end_step(self.models)
            self.models = None
        tracking.end(failed=exc_type is not None)
        failed = None
        if exc_type is not None:
            # The error's first line; the whole of it and its traceback go to the step's log only.
            first_line = str(exc).split("\n", 1)[0]
            failed = f"iteration {self.iteration} {self.name} failed: {exc_type.__name__}: {first_line}"
        if self._handler is not None:
            if failed:
                self._handler.handle(
                    log.makeRecord(log.name, logging.ERROR, __file__, 0, failed, None, (exc_type, exc, tb))
                )
            log.removeHandler(self._handler)
            self._handler.close()
        distributed.finish()
        # Bad input says itself in one line (cli); anything else is a bug, told as one line naming the log.
        if (
            failed
            and self._handler is not None
            and issubclass(exc_type, Exception)
            and not issubclass(exc_type, InputError)
        ):
            raise StepCrashed(f"{failed}; its log: {self.dir / 'log.txt'}") from exc

    def note(self, message: str, level: int = logging.INFO) -> None:
        """A line for the step's log only: the console carries the step's progress, not bookkeeping."""
        if self._handler is not None:
            self._handler.handle(log.makeRecord(log.name, level, __file__, 0, message, None, None))

    def store(self) -> Store:
        """The run's data stores, written by the main process only (core/distributed.py)."""
        from coevolve.data.store import Store

        return Store(self.run_dir, self.cfg.stores.max_rows, writer=distributed.is_main())

    def path(self, name: str) -> Path:
        """Where a finished phase output lives while the step is in progress."""
        return self.dir / name

    def phase(self, name: str, build: Callable[[Path], dict | None]) -> Path:
        """Run `build(tmp)` unless phase `name` finished before; `build` writes its output at `tmp` and
        returns its metrics. The output is renamed into place only when complete."""
        final = self.dir / name
        record = self.dir / "phases" / f"{name}.json"
        # Decided by the main process: another one could see the phase finished by the main one meanwhile.
        if distributed.from_main(record.exists() and final.exists()):
            log.info(f"{name}: done earlier, kept")
            return final
        tmp = self.dir / (f"{name}.tmp" if distributed.is_main() else f"{name}.rank{distributed.rank()}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        from coevolve.core import io_timing

        start = time.perf_counter()
        with io_timing.counted() as io:
            metrics = build(tmp) or {}
        seconds = time.perf_counter() - start
        self.metrics.update(metrics)
        self.timings[name] = seconds
        self.io[name] = io
        if distributed.is_main():
            if not tmp.exists():
                tmp.mkdir()
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            if self.models is not None:
                self.models.moved(tmp, final)
            record_tmp = record.with_suffix(".tmp")
            record_tmp.write_text(json.dumps({"metrics": metrics, "seconds": seconds, "io": io}))
            record_tmp.replace(record)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        tracking.log_phase(name, metrics, seconds, io)
        summary = ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items() if not isinstance(v, (list, dict)))
        moved = (
            f"; {io['loads']} loads {io['load_s']:.1f}s, {io['saves']} saves {io['save_s']:.1f}s"
            if io["loads"] + io["saves"]
            else ""
        )
        log.info(f"{name}: done in {seconds:.1f}s{moved}" + (f" ({summary})" if summary else ""))
        distributed.barrier()
        return final

    def finish(self, outputs: dict[str, str], stop: str | None = None, extra: dict | None = None) -> dict:
        """Write DONE.json and move the step folder into place; `outputs` are names inside the step
        folder or paths already relative to RUN. `stop`: why the run ends after this step, if it does."""
        resolved = {
            k: v if v.startswith("iter_") else str(self.final.relative_to(self.run_dir) / v) for k, v in outputs.items()
        }
        done = {
            "step": self.name,
            "iteration": self.iteration,
            "config_hash": self.cfg.hash(),
            "started": self.started,
            "finished": _now(),
            "inputs": {
                k: rundir.relative(self.run_dir, v) if isinstance(v, Path) else v for k, v in self.inputs.items()
            },
            "outputs": resolved,
            "metrics": self.metrics,
            "timings": self.timings,
            "io": self.io,
            "stop": stop or False,
            "provenance": self.provenance,
            "wandb": tracking.where(),
            **(extra or {}),
        }
        if not distributed.is_main():
            distributed.barrier()
            return done
        tmp = self.dir / "DONE.json.tmp"
        tmp.write_text(json.dumps(done, indent=2, default=float))
        tmp.replace(self.dir / "DONE.json")
        if self.final.exists():
            # Forced re-run: the old outputs are replaced only now that the new ones are complete.
            trash = self.final.with_name(f".{self.name}.old")
            shutil.rmtree(trash, ignore_errors=True)
            self.final.rename(trash)
            self.dir.rename(self.final)
            shutil.rmtree(trash)
        else:
            self.dir.rename(self.final)
        total = sum(self.timings.values())
        log.info(f"iteration {self.iteration} {self.name}: finished in {total:.1f}s -> {self.final}")
        tracking.finish(self, done)
        distributed.barrier()
        return done


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def setup_logging() -> None:
    # No heavy import here: `coevolve run` only launches steps, and its step server imports the
    # libraries in a process of its own.
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Console("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    quiet_third_party()


class _Console(logging.Formatter):
    """Messages without tracebacks: those belong in the step's log file."""

    def formatException(self, exc_info) -> str:
        return ""
