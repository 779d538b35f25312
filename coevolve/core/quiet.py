"""Third-party messages that every step would print and that say nothing about the run: filtered once,
here, each with its reason. `coevolve -v` keeps them: it sets COEVOLVE_VERBOSE=1, which the steps it
launches inherit (and which keys their step server, core/stepserver.py)."""

from __future__ import annotations

import logging
import os
import warnings

VERBOSE_ENV = "COEVOLVE_VERBOSE"


def quiet_third_party() -> None:
    if os.environ.get(VERBOSE_ENV) == "1":
        return
    # transformers renamed gradient_checkpointing to activation_checkpointing, and trl's configs still
    # set the old name (default True), so every trainer warns whatever our config says; the old name
    # works until transformers 6. trl's unwrap_model_for_generation (online E-step) reads the old
    # `is_gradient_checkpointing` the same way.
    warnings.filterwarnings(
        "ignore", message=r"`(is_)?gradient_checkpointing\w*` is deprecated", category=FutureWarning
    )
    # DeepSpeed, imported by transformers and trl, says on every host without a GPU that it picked the
    # CPU, whether or not the step uses DeepSpeed.
    logging.getLogger("DeepSpeed").addFilter(_not_cpu_accelerator)


def _not_cpu_accelerator(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Setting accelerator to CPU")


def prefect_telemetry_off() -> None:
    """Before prefect starts a server: the temporary one of a run with no Prefect server configured sends
    an anonymous usage heartbeat that fails on its sqlite database, locked by the run's own writes, with a
    ~130-line traceback. The run needs no telemetry; a user's own setting wins."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
