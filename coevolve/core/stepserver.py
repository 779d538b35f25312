"""Step processes forked from a step server: a process that imported torch, transformers, trl, datasets
and the step modules once, and that outlives the run that started it.

Each step is still its own process, with its own CUDA context, memory and exit code: only the imports
are shared. They cost 10-16 s per interpreter (2 CPU cores; ~10 s on the GPU machine): more than the
whole overhead budget of a bench-sized iteration, and half of a sandbox run's wall time when every step
paid them. A server forks the steps of every `coevolve run`, flow run or experiment arm with the same
code and environment, and exits after `launch.server_idle_s` seconds without a step, so the imports are
paid once per working session, not once per run. The server never touches CUDA: forked children could
not use it otherwise. `launch.preload: false` turns all this off.

A server serves one key: the Python, its sys.path and what is installed there, the environment variables
that its imports can read (`KEY_ENV`), and coevolve's own sources. Changed code or a change in one of
those variables gets a fresh server, never a stale one; any other variable (a Prefect flow run's id, the
run lock's token, a shell's own) shares the server, and each step still runs with its client's whole
environment. At most `launch.max_servers` servers live at once: starting one more stops the one idle
the longest first (a server running steps is never stopped).

Protocol, over a Unix socket in `runtime_dir()`: the client sends one request (argv, env, cwd) with the
write end of its output pipe; the server forks and answers {"pid": N}, then {"exit": code} when the step
ends. A client that goes away (killed, interrupted) takes its step with it: the server terminates a
step whose client hung up, as a process group kill would have. A request {"stop_if_idle": true}, with no
pipe, is answered {"stopped": bool}, and a server with no step running then exits.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import json
import logging
import os
import runpy
import selectors
import signal
import site
import socket
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path

# The environment variables the server's imports can read, by name or prefix: a step forked from it
# inherits what those imports made of them (a thread pool's size, a cache folder, a library loaded), so
# they, and only they, key the server. Whatever a step reads after the fork, it reads from its own
# client's environment (`_run_step`), and a variable outside this list gets no server of its own.
KEY_ENV = (
    "PATH",
    "LD_",
    "PYTHON",  # what the interpreter loads: libraries, PYTHONPATH, PYTHONHASHSEED, ...
    "HOME",
    "XDG_CACHE_HOME",
    "TMPDIR",
    "LANG",
    "LC_",  # cache and temporary folders, locale: fixed at import
    "CUDA_",
    "NVIDIA_",
    "TORCH",
    "PYTORCH_",
    "TRITON_",
    "NCCL_",
    "OMP_",
    "MKL_",
    "OPENBLAS_",
    "KMP_",  # thread pools, sized when their library loads
    "HF_",
    "HUGGINGFACE_",
    "TRANSFORMERS_",
    "TOKENIZERS_",
    "DATASETS_",
    "ACCELERATE_",
    "DS_",
    "WANDB_",
    "COEVOLVE_",
)
# Set per run by coevolve itself, read by the step only.
NOT_KEY_ENV = frozenset({"COEVOLVE_RUN_LOCK"})
HEADER = struct.Struct("!Q")


# A Unix socket's path holds at most 107 characters (Linux's 108 bytes, the last a NUL); the longest name
# in the folder is a server's socket while it binds: a 20-character key, its pid, ".binding".
SOCKET_PATH_MAX = 107


def _longest_name() -> int:
    try:
        pid_digits = len(str(int(Path("/proc/sys/kernel/pid_max").read_text()) - 1))
    except (OSError, ValueError):
        pid_digits = 7  # 64-bit Linux's largest
    return len(f"/{'0' * 20}.{'0' * pid_digits}.binding")


def runtime_dir(env: dict[str, str]) -> Path:
    if "COEVOLVE_RUNTIME_DIR" in env:
        path = Path(env["COEVOLVE_RUNTIME_DIR"])
    elif "XDG_RUNTIME_DIR" in env:
        path = Path(env["XDG_RUNTIME_DIR"]) / "coevolve"
    else:
        path = Path(f"/tmp/coevolve-{os.getuid()}")
    if len(str(path.absolute())) + _longest_name() > SOCKET_PATH_MAX:
        raise RuntimeError(
            f"step server folder {path.absolute()}: too long for the step servers' sockets (at most "
            f"{SOCKET_PATH_MAX - _longest_name()} characters); set COEVOLVE_RUNTIME_DIR to a shorter folder, or launch.preload: false"
        )
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Whoever can write there can have steps run as us: it must be ours alone.
    stat = path.stat()
    if stat.st_uid != os.getuid() or stat.st_mode & 0o077:
        raise RuntimeError(
            f"step server folder {path}: must be owned by this user and closed to others (chmod 700); "
            "or set COEVOLVE_RUNTIME_DIR, or launch.preload: false"
        )
    return path


def server_key(env: dict[str, str]) -> str:
    """What a fresh `python -m coevolve` would import is set by the interpreter, the folder it starts in
    (first on its sys.path), the variables of `KEY_ENV` and what is installed; a package installed or
    removed changes its site folder's mtime."""
    h = hashlib.sha256(f"{sys.executable}:{os.getcwd()}".encode())
    for site_dir in [*site.getsitepackages(), site.getusersitepackages()]:
        h.update(f"{site_dir}:{os.stat(site_dir).st_mtime_ns if os.path.isdir(site_dir) else ''}".encode())
    for name in sorted(name for name in env if name.startswith(KEY_ENV) and name not in NOT_KEY_ENV):
        h.update(f"{name}={env[name]}".encode())
    for source in sorted(_source_files()):
        stat = source.stat()
        h.update(f"{source}:{stat.st_mtime_ns}:{stat.st_size}".encode())
    return h.hexdigest()[:20]


def _source_files() -> set[Path]:
    import coevolve

    # coevolve.flows, .policy, ... map to top-level folders of a checkout (pyproject's package-dir); an
    # installed wheel has them inside coevolve/, whose walk finds them too: each file is keyed once.
    folders = {Path(p) for p in coevolve.__path__}
    for sub in ("flows", "policy", "reward", "revision", "data"):
        folders.update(Path(p) for p in importlib.import_module(f"coevolve.{sub}").__path__)
    return {f for folder in folders for f in folder.rglob("*.py")}


# --- client -----------------------------------------------------------------------------------------


class ServerGone(RuntimeError):
    pass


class ForkedStep:
    """`coevolve ARGV` forked from the step server for `env` (started if none is up), with the part of
    `subprocess.Popen`'s interface that `launch.run_process` uses: `stdout` (text, stderr merged), pid,
    poll, wait, terminate, kill."""

    def __init__(self, argv: list[str], env: dict[str, str], idle_s: float, max_servers: int):
        path = runtime_dir(env) / f"{server_key(env)}.sock"
        self._log = path.with_suffix(".log")
        self._code: int | None = None
        try:
            self.pid = self._request(path, argv, env, idle_s, max_servers)
        except ServerGone:
            # A server that ends on idle as we connect closes our connection before it forks the step,
            # and its socket is gone by then: the step never started, and a fresh server is asked.
            self._conn.close()
            self.stdout.close()
            self.pid = self._request(path, argv, env, idle_s, max_servers)

    def _request(self, path: Path, argv: list[str], env: dict[str, str], idle_s: float, max_servers: int) -> int:
        self._conn = _connect(path, env, idle_s, max_servers)
        self._buffer = b""
        read, write = os.pipe()
        self.stdout = os.fdopen(read, "r", errors="replace")
        body = json.dumps({"argv": argv, "env": env, "cwd": os.getcwd()}).encode()
        try:
            socket.send_fds(self._conn, [HEADER.pack(len(body))], [write])
            self._conn.sendall(body)
        except OSError:
            pass  # the server went away: the reply says so
        finally:
            os.close(write)  # the step holds the only write end, so its exit ends the stream
        return self._reply(None)["pid"]

    def _reply(self, timeout: float | None) -> dict | None:
        while b"\n" not in self._buffer:
            self._conn.settimeout(timeout)
            try:
                chunk = self._conn.recv(4096)
            except (BlockingIOError, TimeoutError):
                return None
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise ServerGone(f"the step server went away; its log: {self._log}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _exit(self, timeout: float | None) -> int | None:
        if self._code is None:
            reply = self._reply(timeout)
            if reply is not None:
                self._code = reply["exit"]
                self._conn.close()
        return self._code

    def poll(self) -> int | None:
        return self._exit(0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._exit(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(f"coevolve (pid {self.pid})", timeout)
        return code

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass


def _connect(path: Path, env: dict[str, str], idle_s: float, max_servers: int) -> socket.socket:
    try:
        return _open(path)
    except (FileNotFoundError, ConnectionRefusedError):
        pass
    # One client at a time starts a server: those racing for this one find it started, and the others
    # count it against the cap.
    with open(path.parent / "start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _open(path)
        except (FileNotFoundError, ConnectionRefusedError):
            path.unlink(missing_ok=True)  # left by a server that was killed
        _make_room(path.parent, max_servers - 1)
        log = path.with_suffix(".log")
        with open(log, "ab") as out:
            server = subprocess.Popen(
                [sys.executable, "-m", "coevolve.core.stepserver", str(path), str(idle_s)],
                env={**env, "PYTORCH_NVML_BASED_CUDA_CHECK": "1"},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # not in our process group: it outlives us
            )
        logging.getLogger("coevolve").info(
            f"step server {server.pid} started: it imports the libraries once for this and later runs, exits after {idle_s:g} s "
            f"without a step (launch.server_idle_s); log: {log}"
        )
        # It listens before it imports: requests wait in the socket's queue meanwhile.
        while not path.exists():
            if server.poll() is not None:
                raise RuntimeError(f"the step server exited at start (code {server.returncode}); its log: {log}")
            time.sleep(0.02)
        return _open(path)


def _make_room(folder: Path, keep: int) -> None:
    """Stop the servers idle the longest until at most `keep` are left; those running steps stay."""
    live = [log.with_suffix(".sock") for _, log, _ in list_servers(folder)]
    excess = len(live) - keep
    # A server touches its pid file whenever its last step ends: the oldest file, the longest idle.
    for sock in sorted(live, key=lambda sock: _mtime(sock.with_suffix(".pid"))):
        if excess <= 0:
            return
        excess -= _stop_if_idle(sock)
    if excess > 0:
        logging.getLogger("coevolve").info(
            f"{len(live)} step servers run steps (launch.max_servers: {keep + 1}); one more starts, each ends after its idle time"
        )


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0  # its server is ending


def _stop_if_idle(path: Path) -> bool:
    body = json.dumps({"stop_if_idle": True}).encode()
    try:
        with _open(path) as conn, conn.makefile("rb") as reply:
            # A server still importing answers once it is ready.
            conn.settimeout(30)
            conn.sendall(HEADER.pack(len(body)) + body)
            return json.loads(reply.readline())["stopped"]
    except (OSError, ValueError, KeyError):
        return False


def _open(path: Path) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        raise
    return conn


def code_location() -> str:
    """The coevolve sources this process runs: a checkout's, or an installed wheel's."""
    import coevolve

    return str(Path(coevolve.__file__).resolve().parent)


def list_servers(folder: Path) -> list[tuple[int, Path, str | None]]:
    """(pid, log, code location) of every live step server whose socket is in `folder`."""
    live = []
    for pid_file in sorted(folder.glob("*.pid")):
        try:
            pid = int(pid_file.read_text())
            os.kill(pid, 0)
        except (ProcessLookupError, ValueError, FileNotFoundError):
            continue  # ended meanwhile, or killed without cleaning up: its socket refuses, and a client replaces it
        code = pid_file.with_suffix(".code")
        live.append((pid, pid_file.with_suffix(".log"), code.read_text() if code.exists() else None))
    return live


def stop_servers(folder: Path, code: str | None = None) -> None:
    """Terminate the step servers whose socket is in `folder`, those running the sources at `code` only
    unless it is None (another checkout's runs, sharing the folder, keep theirs); each terminates its
    running steps."""
    for pid, _, location in list_servers(folder):
        if code is not None and location != code:
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


# --- server -----------------------------------------------------------------------------------------


def serve(path: Path, idle_s: float) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bound under another name and renamed once listening: a client that sees the socket can connect
    # (between bind and listen, a connect is refused).
    binding = path.with_suffix(f".{os.getpid()}.binding")
    binding.unlink(missing_ok=True)
    listener.bind(str(binding))
    listener.listen(64)
    pid_file = path.with_suffix(".pid")
    code_file = path.with_suffix(".code")
    code_file.write_text(code_location())
    # Written before the socket appears: a server that clients can reach is one the cap counts.
    pid_file.write_text(str(os.getpid()))
    binding.replace(path)
    steps: dict[int, socket.socket] = {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        from coevolve.core.quiet import quiet_third_party
        from coevolve.core.steps import STEPS

        quiet_third_party()  # before the imports, some of which warn

        for step in STEPS.values():
            importlib.import_module(step.module)
        print(
            f"{time.strftime('%F %T')} step server {os.getpid()} ready ({path.name}, exits after {idle_s:g} s idle)",
            flush=True,
        )
        _loop(listener, steps, idle_s, pid_file)
    finally:
        for pid in steps:
            os.kill(pid, signal.SIGTERM)
        path.unlink(missing_ok=True)
        pid_file.unlink(missing_ok=True)
        code_file.unlink(missing_ok=True)


def _loop(listener: socket.socket, steps: dict[int, socket.socket], idle_s: float, pid_file: Path) -> None:
    events = selectors.DefaultSelector()
    events.register(listener, selectors.EVENT_READ, ("request", None))
    idle_since = time.monotonic()
    hung_up: set[socket.socket] = set()
    while True:
        ready = events.select(None if steps else max(0.0, idle_since + idle_s - time.monotonic()))
        if not ready and not steps:
            return
        for key, _ in ready:
            kind, pid = key.data
            if kind == "request":
                conn, _ = listener.accept()
                request, out = _read_request(conn)
                if request is not None and out == -1:
                    # Stopped only when the asker still waits for the answer: one that gave up counts it live.
                    stopped = _send(conn, {"stopped": not steps}) and not steps
                    conn.close()
                    if stopped:
                        print(
                            f"{time.strftime('%F %T')} step server {os.getpid()} stopped: another was starting over launch.max_servers",
                            flush=True,
                        )
                        return
                    continue
                if request is None:
                    conn.close()
                    continue
                pid = _fork(conn, request, out, events)
                steps[pid] = conn
                events.register(conn, selectors.EVENT_READ, ("client", pid))
                events.register(os.pidfd_open(pid), selectors.EVENT_READ, ("exit", pid))
            elif kind == "client":
                if pid not in steps:
                    continue  # the step ended in this same round of events, and its connection with it
                # Nothing more is ever sent: readable means the client hung up.
                events.unregister(key.fileobj)
                hung_up.add(steps[pid])
                os.kill(pid, signal.SIGTERM)
            else:
                events.unregister(key.fd)
                os.close(key.fd)
                _, status = os.waitpid(pid, 0)
                conn = steps.pop(pid)
                _send(conn, {"exit": os.waitstatus_to_exitcode(status)})
                if conn in hung_up:
                    hung_up.remove(conn)
                else:
                    events.unregister(conn)
                conn.close()
                if not steps:
                    idle_since = time.monotonic()
                    os.utime(pid_file)


def _fork(conn: socket.socket, request: dict, out: int, events: selectors.BaseSelector) -> int:
    pid = os.fork()
    if pid == 0:
        # The step keeps none of the server's sockets: a client waits for EOF from the server's end.
        for key in list(events.get_map().values()):
            key.fileobj.close() if isinstance(key.fileobj, socket.socket) else os.close(key.fd)
        events.close()
        conn.close()
        _run_step(request, out)
    os.close(out)
    _send(conn, {"pid": pid})
    return pid


def _read_request(conn: socket.socket) -> tuple[dict | None, int]:
    """The client's request and the write end of its output pipe (-1 for a request to stop, which has
    none); (None, -1) for a broken one."""
    conn.settimeout(10)  # a client sends its whole request at once; never wait long on a broken one
    fds: list[int] = []
    try:
        header, fds, _, _ = socket.recv_fds(conn, HEADER.size, 1)
        body = b""
        while len(header) == HEADER.size and len(body) < HEADER.unpack(header)[0]:
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            body += chunk
        if len(header) == HEADER.size and len(body) == HEADER.unpack(header)[0]:
            request = json.loads(body)
            if len(fds) == 1:
                return request, fds[0]
            if not fds and request == {"stop_if_idle": True}:
                return request, -1
    except (OSError, ValueError):
        pass
    for fd in fds:
        os.close(fd)
    return None, -1


def _send(conn: socket.socket, message: dict) -> bool:
    try:
        conn.sendall(json.dumps(message).encode() + b"\n")
        return True
    except OSError:
        return False  # the client is gone; its step was terminated or has ended anyway


def _run_step(request: dict, out: int) -> None:
    """In the forked child: become `coevolve ARGV` as the client would have started it; never returns."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(devnull)
    os.close(out)
    # Line-buffered, as the unbuffered fresh interpreter was: lines must reach the caller as they come.
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    code = 0
    try:
        if "OMP_NUM_THREADS" in os.environ:
            import torch

            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        # What the client would have started, `python -m coevolve ARGV`, run as python runs it: the
        # server serves that command without depending on the CLI that parses it.
        sys.argv = ["coevolve", *request["argv"]]
        runpy.run_module("coevolve", run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        if isinstance(stop.code, int) or stop.code is None:
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    serve(Path(sys.argv[1]), float(sys.argv[2]))
