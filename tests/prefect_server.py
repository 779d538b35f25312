"""A real Prefect server for the flow tests: started on 127.0.0.1 with its own PREFECT_HOME (SQLite),
stopped when the module's tests are done. Import the fixture into a test module to use it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

PREFECT = str(Path(sys.executable).with_name("prefect"))


@dataclass
class PrefectServer:
    url: str
    home: Path

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a process that talks to this server (a flow, the CLI, a served deployment)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        return {**env, "PREFECT_API_URL": self.api_url, "PREFECT_HOME": str(self.home), "OMP_NUM_THREADS": "1", **extra}

    def post(self, path: str, body: dict) -> dict:
        """A JSON API call, for what the Python client has no method for (e.g. reading events)."""
        request = urllib.request.Request(
            f"{self.api_url}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.loads(reply.read())

    def prefect(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([PREFECT, *args], env=self.env(), capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect_home")
    port = _free_port()
    server = PrefectServer(url=f"http://127.0.0.1:{port}", home=home)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
        # The UI's pages call this API; left unset it would be the default port's, not ours.
        PREFECT_UI_API_URL=server.api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
    )
    log = open(home / "server.log", "w")
    # Its own session, so teardown stops the server and whatever it spawned, and nothing else.
    proc = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not _healthy(server.url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not come up:\n{(home / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
