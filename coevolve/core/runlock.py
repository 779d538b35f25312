"""One command at a time on a run directory: `RUN/.lock`, an flock held by the command that writes the
run (`coevolve run`, `coevolve step`, the Prefect flow) for as long as it runs.

The steps that `coevolve run` launches are processes of their own (forked from a step server, or
started by accelerate/deepspeed on several ranks), which neither inherit the lock nor may wait for it.
The holder passes a token in `COEVOLVE_RUN_LOCK`: a step whose token is the one in the lock file, while
the lock is held, runs under its launcher's lock. The kernel drops an flock with the process that held
it, so the lock of a killed command is free at once; the holder's record left in the file tells who
died holding it. Readers (`report`, `data show/export`) take no lock."""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import logging
import os
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from coevolve.core import distributed
from coevolve.core.rundir import RunDirError

LOCK_ENV = "COEVOLVE_RUN_LOCK"
log = logging.getLogger("coevolve")


def lock_path(run: Path) -> Path:
    return Path(run) / ".lock"


@contextmanager
def held(run: Path | str, command: str) -> Iterator[None]:
    """Hold the run directory's lock, or run under the lock of the command that launched this one; a
    run directory locked by another command raises RunDirError naming it."""
    run = Path(run)
    # Other ranks of a launched step write nothing; their main process holds the lock for them.
    if not distributed.is_main() or _held_for_us(run):
        yield
        return
    created = not run.exists()
    try:
        run.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path(run), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise RunDirError(
            f"{run}: cannot take its lock {lock_path(run)} ({err.strerror}); a command that writes the run needs it writable"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirError(f"{run}: in use by {describe(_read(fd))}; wait for it to end, or stop it") from None
        left = _read(fd)
        if left:
            log.info(f"{run}: took over the lock of {describe(left)}, which ended without releasing it")
        token = secrets.token_hex(8)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "token": token,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        outer = os.environ.get(LOCK_ENV)
        os.environ[LOCK_ENV] = token  # for the step processes this command launches
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            if outer is None:
                os.environ.pop(LOCK_ENV, None)
            else:
                os.environ[LOCK_ENV] = outer
            # Released in order: the next holder finds nobody to take over from.
            os.ftruncate(fd, 0)
            # A command that failed before any step wrote anything (a bad config, bad data found by init's
            # checks) leaves no run directory behind: nothing but the config it was refused with.
            written = set(os.listdir(run)) - {lock_path(run).name}
            if created and (not written or (failed and written == {"config.yaml"})):
                for name in written:
                    os.unlink(run / name)
                os.unlink(lock_path(run))
                os.rmdir(run)
    finally:
        os.close(fd)  # drops the flock


def _held_for_us(run: Path) -> bool:
    """True when the lock is held now, by the command whose token we were given."""
    token = os.environ.get(LOCK_ENV)
    if not token:
        return False
    try:
        fd = os.open(lock_path(run), os.O_RDONLY)
    except OSError:
        return False
    try:
        if _read(fd).get("token") != token:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True  # held, by our launcher
        return False  # free: our launcher is gone, and we take the lock as any command would
    finally:
        os.close(fd)


def _read(fd: int) -> dict:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}  # being written by its new holder, this very moment
    return record if isinstance(record, dict) else {}


def describe(record: dict) -> str:
    if "pid" not in record:
        return "another command"
    host = "" if record.get("host") == socket.gethostname() else f" on {record.get('host')}"
    return f"pid {record['pid']}{host} ({record.get('command')}, since {record.get('started')})"
