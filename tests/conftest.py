"""Shared fixtures: a tiny run directory prepared once (init, sft-warmup, rm-init), copied per test."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from coevolve.cli import run_step
from coevolve.core.config import prepare_run
from coevolve.core.step import setup_logging
from coevolve.core.stepserver import stop_servers

# Steps run in-process by the tests are not tracked; the tracking tests set their own mode. Without
# this, a developer's `wandb login` would send test runs to their account.
os.environ.setdefault("WANDB_MODE", "disabled")
# The suite's step servers (core/stepserver.py) live in a folder of their own and end with the session,
# not after their idle time, and never serve a developer's own runs.
os.environ["COEVOLVE_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="coevolve-tests-")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
# configs/tiny.yaml made smaller still: the tests check behaviour, not quality. The demo's RM (the SFT
# policy with a score head, trained on pairs the policy samples in rm-init) and its heavier E- and M-steps
# are for a policy that improves; here, the char-level RM on init's generator pairs, trained from scratch,
# and the paper's pair rule, with one DPO epoch and no original pairs in the M-step's mix.
FAST = [
    "rm={tiny: {tokenizer: char, hidden_size: 64, num_layers: 2, num_heads: 4, intermediate_size: 128, seed: 1, max_position_embeddings: 512}}",
    "data.pair_source=generator",
    "e_step.pair_rule=length_controlled",
    "e_step.train.num_train_epochs=1",
    "m_step.original_pairs_ratio=0",
    "data.num_prompts=120",
    "data.num_pairs=240",
    "data.num_demos=300",
    "data.select_size=16",
    "data.eval_size=24",
    "sft_warmup.num_train_epochs=2",
    "rm_init.num_train_epochs=2",
    "e_step.num_samples=3",
    "e_step.save_steps=2",
    "e_step.tau=0.0",
]

# A test that takes one of these fixtures runs steps or a server: an integration test.
RUN_FIXTURES = {"prepared_run", "tiny_run", "prefect_server"}


# The files on the shared tiny run (tiny_run.py; built in ~90 s): `make test` hands them to one xdist
# worker together, as --dist loadfile hands it each other file, so that the run is built once.
ON_TINY_RUN = {"test_readme.py", "test_report.py", "test_steps.py", "test_summary.py", "test_tracking.py"}
# The files that take longest here (1.5 to 6 minutes of a worker each, `make test` on 2026-12-07), started
# first (`make test` keeps the collection's order, --no-loadscope-reorder): xdist's own order, by number of
# tests, started test_flows, the longest, after 88% of the tests, when little was left to balance it. Longest
# first down to half a minute, so that only short files are left for the end: test_run_integrity (~70 s)
# last kept one worker busy alone for a minute after the other had finished.
LONGEST_FIRST = [
    "test_flows.py",
    *sorted(ON_TINY_RUN),
    "test_launch.py",
    "test_data_parallel.py",
    "test_demo.py",
    "test_compile.py",
    "test_evaluate.py",
    "test_run_integrity.py",
    "test_bench_training.py",
    "test_online.py",
    "test_real_model.py",
    "test_inputs.py",
]


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class TinyRunTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = super()._split_scope(nodeid)
            return "tiny_run" if Path(file).name in ON_TINY_RUN else file

    return TinyRunTogether(config, log)


def pytest_collection_modifyitems(config, items):
    on_tiny_run = {Path(item.fspath).name for item in items if "tiny_run" in item.fixturenames}
    assert on_tiny_run <= ON_TINY_RUN, f"add {sorted(on_tiny_run - ON_TINY_RUN)} to conftest.ON_TINY_RUN"
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(item.fspath).name, len(rank)))
    cuda = None
    for item in items:
        if RUN_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("gpu"):
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(scope="session", autouse=True)
def step_servers():
    folder = Path(os.environ["COEVOLVE_RUNTIME_DIR"])
    yield folder
    stop_servers(folder)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def prepared_run(tmp_path_factory) -> Path:
    setup_logging()
    run = tmp_path_factory.mktemp("prepared") / "run"
    cfg = prepare_run(str(TINY), FAST, run)
    for name in ("init", "sft-warmup", "rm-init"):
        run_step(name, run, 0, cfg)
    return run


@pytest.fixture
def fresh_run(prepared_run, tmp_path) -> Path:
    """A private copy of the prepared run, for tests that add steps to it."""
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    return run


@pytest.fixture(scope="session")
def iterated_run(prepared_run, tmp_path_factory) -> Path:
    """The prepared run plus iteration 1's e-step and m-step."""
    run = tmp_path_factory.mktemp("iterated") / "run"
    shutil.copytree(prepared_run, run)
    cfg = prepare_run(None, [], run)
    for name in ("e-step", "m-step"):
        run_step(name, run, 1, cfg)
    return run
