"""Before anything is loaded from the Hugging Face hub: whether a name is meant as a local path, and
whether the hub can be reached. Asked first because the hub's clients treat a missing local folder as a
hub id, and retry an unreachable hub for 25-50 s before they fail."""

from __future__ import annotations

import os
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

from huggingface_hub import constants


def looks_like_path(name: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else, or a path into an existing folder, is a path."""
    return name.startswith((".", "~", os.sep)) or name.count("/") > 1 or ("/" in name and Path(name).parent.is_dir())


def reachable(timeout: float = 3.0) -> bool:
    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT)
    reached = []

    def probe():
        try:
            socket.create_connection((host.hostname, host.port or 443), timeout=timeout).close()
            reached.append(True)
        except OSError:
            pass

    # In a thread: a name lookup that hangs is not bounded by the socket's timeout.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(reached)


@contextmanager
def offline():
    """The hub's clients read only their caches inside, as under HF_HUB_OFFLINE=1 (datasets keeps its
    own copy of the flag, read at import)."""
    import datasets

    with (
        mock.patch.object(constants, "HF_HUB_OFFLINE", True),
        mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True),
    ):
        yield
