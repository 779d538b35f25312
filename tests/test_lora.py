"""LoRA training (`lora:` in a training config): adapters in the top layers only, merged into plain
checkpoints that the next step loads like any other."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, TINY
from safetensors.torch import load_file

from coevolve.cli import run_step
from coevolve.core import rundir
from coevolve.core.config import ConfigError, prepare_run
from coevolve.core.training import lora_config

LORA = [
    "sft_warmup.lora.top_layers=1",
    "rm_init.lora.top_layers=1",
    "e_step.train.lora.top_layers=1",
    "m_step.train.lora.top_layers=1",
]


def weights(path) -> dict[str, torch.Tensor]:
    assert not list(path.glob("adapter_*")), f"{path} holds adapters, not a merged model"
    return load_file(path / "model.safetensors")


def changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {name for name in before if not torch.equal(before[name], after[name])}


@pytest.mark.integration
def test_lora_trains_only_the_top_layer_and_saves_merged_models(tmp_path):
    run = tmp_path / "run"
    # The static backend: the E-step's DPO then takes its reference (the policy with adapters off) from sampling.
    cfg = prepare_run(
        str(TINY), [*FAST, *LORA, "policy.tiny.num_layers=2", "rm.tiny.num_layers=2", "generation.backend=static"], run
    )
    for name in ("init", "sft-warmup", "rm-init"):
        run_step(name, run, 0, cfg)
    for name in ("e-step", "m-step"):
        run_step(name, run, 1, cfg)

    def output(k, step, name):
        return run / rundir.read_done(run, k, step)["outputs"][name]

    for start, trained in [
        (output(0, "init", "policy"), output(0, "sft-warmup", "policy")),
        (output(0, "sft-warmup", "policy"), output(1, "e-step", "policy")),
        (output(0, "init", "rm"), output(0, "rm-init", "rm")),
        (output(0, "rm-init", "rm"), output(1, "m-step", "rm")),
    ]:
        moved = changed(weights(start), weights(trained))
        # Attention and MLP projections of layer 1 only (the RM's score head too, trained in full).
        assert moved and all(n.startswith("model.layers.1.") and "proj" in n or n == "score.weight" for n in moved), (
            sorted(moved)
        )
        assert any(n.startswith("model.layers.1.") for n in moved)
    e_step = rundir.read_done(run, 1, "e-step")["metrics"]
    assert e_step["dpo/reference_logps"] == "sampling" and e_step["dpo/loss_last"] < e_step["dpo/loss_first"]
    assert "score.weight" in changed(weights(output(0, "init", "rm")), weights(output(0, "rm-init", "rm")))
    # Every model-selection candidate was merged too: any of them can become the next policy.
    for ckpt in (run / "iter_1" / "e-step" / "train" / "checkpoints").glob("checkpoint-*"):
        weights(ckpt)


def test_lora_without_peft_names_the_option(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_peft(name, *args, **kwargs):
        if name == "peft":
            raise ImportError("no peft")
        return real_import(name, *args, **kwargs)

    cfg = prepare_run(str(TINY), ["rm_init.lora.r=4"], tmp_path / "run")
    monkeypatch.setattr(builtins, "__import__", no_peft)
    with pytest.raises(ConfigError, match=r"`lora` needs peft: pip install 'coevolve\[lora\]'"):
        lora_config(cfg.rm_init, tmp_path, "SEQ_CLS")
