"""Compiled training (`train.compile`) and torch.compile's caches in one folder (`launch.compile_cache`,
core/compile_cache.py): where the folder is, that a launched step process points torch at it, and that
a second e-step of a run loads what the first compiled instead of compiling it again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST
from trl import DPOConfig, RewardConfig

from coevolve.core import compile_cache, provenance
from coevolve.core.config import ConfigError, load_config
from coevolve.core.steps import STEPS
from coevolve.core.training import trainer_args

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
# Every training config.
SECTIONS = (
    "sft_warmup",
    "rm_init",
    "e_step.train",
    "e_step.sft",
    "e_step.online.train",
    "m_step.train",
    "reviser.train",
)


def test_the_cache_folder_is_under_the_users_cache_folder_unless_set(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.folder(None, {}) == tmp_path / "home" / ".cache" / "coevolve" / "compile"
    assert compile_cache.folder(None, {"XDG_CACHE_HOME": str(tmp_path / "xdg")}) == tmp_path / "xdg/coevolve/compile"
    monkeypatch.setenv("SCRATCH", str(tmp_path / "scratch"))
    assert compile_cache.folder("$SCRATCH/cc", {}) == tmp_path / "scratch" / "cc"
    assert compile_cache.folder("~/cc", {}) == tmp_path / "home" / "cc"
    monkeypatch.chdir(tmp_path)
    assert compile_cache.folder("rel/cc", {}) == tmp_path / "rel" / "cc"


def test_use_points_inductor_and_triton_at_the_folder_and_keeps_a_users_switch(tmp_path, monkeypatch):
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")  # a user debugging the cache turned it off
    monkeypatch.setattr(inductor_config, "fx_graph_cache", True)
    monkeypatch.setattr(functorch_config, "enable_autograd_cache", False)
    monkeypatch.setattr(compile_cache, "_in_use", None)
    env = compile_cache.use(tmp_path / "cc")
    assert env == {
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cc/inductor"),
        "TRITON_CACHE_DIR": str(tmp_path / "cc/triton"),
    }
    assert {k: os.environ[k] for k in env} == env
    assert os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "0" and inductor_config.fx_graph_cache is False
    assert os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] == "1" and functorch_config.enable_autograd_cache is True
    assert compile_cache.in_use() == tmp_path / "cc"

    from torch._inductor.runtime.cache_dir_utils import cache_dir, triton_cache_dir

    assert cache_dir() == str(tmp_path / "cc/inductor") and triton_cache_dir(0) == str(tmp_path / "cc/triton")


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")  # trl's, core/quiet.py
def test_compile_is_one_typed_field_that_turns_trls_on_with_padded_lengths(tmp_path):
    cfg = load_config(TINY, ["e_step.train.compile=true"])
    dpo = trainer_args(DPOConfig, cfg.e_step.train, cfg, tmp_path)
    assert dpo.torch_compile and dpo.pad_to_multiple_of == compile_cache.PAD_MULTIPLE
    rm = trainer_args(RewardConfig, cfg.m_step.train, cfg, tmp_path)
    assert not rm.torch_compile and rm.pad_to_multiple_of is None
    # A padding given in `extra` is the user's.
    cfg = load_config(TINY, ["m_step.train.compile=true", "m_step.train.extra={pad_to_multiple_of: 8}"])
    assert trainer_args(RewardConfig, cfg.m_step.train, cfg, tmp_path).pad_to_multiple_of == 8
    with pytest.raises(ConfigError, match=r"e_step.train: extra.torch_compile: set `compile: true` instead"):
        load_config(TINY, ["e_step.train.extra={torch_compile: true}"])
    with pytest.raises(ConfigError, match=r"m_step.train: extra.torch_compile_backend/mode turn torch.compile on"):
        load_config(TINY, ["m_step.train.extra={torch_compile_mode: max-autotune}"])


def test_compiling_is_how_a_step_computes_not_what_so_no_finished_step_goes_stale():
    plain, compiled = (load_config(TINY, [f"{s}.compile={on}" for s in SECTIONS]) for on in ("false", "true"))
    for name in STEPS:
        assert provenance.fields(plain, name) == provenance.fields(compiled, name)
        assert not [key for key in provenance.fields(compiled, name) if key.endswith(".compile")]
    assert "e_step.train.learning_rate" in provenance.fields(compiled, "e-step")


def test_no_shipped_config_compiles_its_training():
    # Measured over a whole DPO epoch at mixed lengths (bench/RESULTS.md, 2026-12-07), compiling lost to
    # eager training even on a warm cache; a config that turns it on should come with a figure that pays.
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert not [s for s in SECTIONS if _field(cfg, s).compile], path.name
        assert cfg.launch.compile_cache is None  # the user's cache folder


def _field(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _run(run_dir: Path, *overrides: str, config: Path | None = TINY) -> None:
    cmd = [sys.executable, "-m", "coevolve", "run", "--run-dir", str(run_dir), *overrides]
    if config is not None:
        cmd[4:4] = ["--config", str(config)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.integration
@pytest.mark.parametrize("preload", [True, False])
def test_a_launched_step_process_sets_the_cache_folders(tmp_path, preload):
    # Forked from the step server (which imported torch's compiler settings before this run existed), or
    # a fresh interpreter: both point torch at the run's folder before the step begins.
    run, cache = tmp_path / "run", tmp_path / "cc"
    _run(
        run,
        *FAST,
        "iterations=0",
        "steps.sft_warmup=false",
        "steps.rm_init=false",
        f"launch.preload={str(preload).lower()}",
        f"launch.compile_cache={cache}",
    )
    log = (run / "iter_0" / "init" / "log.txt").read_text()
    line = f"torch.compile caches (launch.compile_cache): TORCHINDUCTOR_CACHE_DIR={cache / 'inductor'}, TRITON_CACHE_DIR={cache / 'triton'}"
    assert line in log, log[-2000:]


@pytest.mark.slow
def test_the_second_e_step_loads_what_the_first_compiled(fresh_run, tmp_path):
    # Two e-steps (the M-step off), each its own process forked from the step server, compiling the tiny
    # policy's DPO on the CPU (Inductor builds C++ there): the first compiles and fills the folder, the
    # second finds every graph in it. Whole batches only, so that no partial last batch makes dynamo
    # compile every graph a second time, for a dynamic batch size (half this test's time).
    cache = tmp_path / "cc"
    _run(
        fresh_run,
        "iterations=2",
        "steps.m_step=false",
        # The static engine hands DPO the reference's log-probs from sampling: no reference forward to
        # compile (8 graphs -> 5, 65 s of compiling -> 50 here).
        "generation.backend=static",
        "e_step.train.compile=true",
        "e_step.train.extra={loss_type: [sigmoid, sft], loss_weights: [1.0, 1.0], dataloader_drop_last: true}",
        f"launch.compile_cache={cache}",
        config=None,
    )
    first, second = (
        json.loads((fresh_run / f"iter_{k}" / "e-step" / "DONE.json").read_text())["metrics"] for k in (1, 2)
    )
    for m in (first, second):
        assert m["dpo/compiled"] is True and m["dpo/compile_cache"] == str(cache)
        assert m["dpo/steps"] >= 2
    assert first["dpo/compile_cache_misses"] > 0
    assert second["dpo/compile_cache_misses"] == 0 and second["dpo/compile_cache_hits"] > 0
    assert second["dpo/compile_s"] < first["dpo/compile_s"]
    assert any((cache / "inductor" / "fxgraph").iterdir())
    print(f"compile: first e-step {first['dpo/compile_s']} s, second {second['dpo/compile_s']} s", file=sys.stderr)
