"""How an error message names what the user changes: a command's flags on the CLI, or the flow's
parameters in the Prefect UI's run form, where `--run-dir` or `--redo` mean nothing."""

from __future__ import annotations

from typing import NamedTuple


class Terms(NamedTuple):
    run_dir: str
    config: str
    drop_config: str
    overrides: str
    redo: str


CLI = Terms(
    run_dir="a new --run-dir",
    config="--config",
    drop_config="leave out --config to continue the run as it is",
    overrides="change fields with key=value",
    redo="add --redo to redo them",
)
FLOW = Terms(
    run_dir="a new run_dir",
    config="the config parameter",
    drop_config="leave config empty to continue the run with its own config",
    overrides="change fields in overrides (key=value)",
    redo="run `coevolve run --redo` on the run directory to redo them",
)
