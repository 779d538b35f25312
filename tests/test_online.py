"""The online E-step (e_step.mode grpo | rloo, policy/online.py) on the tiny models, with real trl training."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from statistics import mean

import datasets
import pytest
import torch
from coevolve.data.selection import policy_batch
from coevolve.policy import online
from conftest import FAST, TINY
from transformers import TrainerCallback

from coevolve.cli import run_step
from coevolve.core import rundir
from coevolve.core.chat import policy_prompt_text
from coevolve.core.config import load_config, prepare_run
from coevolve.core.fastgen import StaticGraphBackend
from coevolve.core.rollout import sample_each, sampling_params, score_each

ROOT = Path(__file__).resolve().parents[1]
# tiny.yaml's rate, 4 groups of 3 rollouts a step and 4 passes over the prompts: 52 steps on the fixture's 53 prompts.
ONLINE = ["e_step.online.train.per_device_train_batch_size=12", "e_step.online.train.num_train_epochs=4"]


def rm_mean_score(cfg, run, policies: list[Path], rm: Path, prompts: list[str]) -> list[float]:
    """The RM's mean score of 4 samples per prompt from each policy, all sampled with one seed."""
    gens = sample_each(cfg, [(p, 7, p.name) for p in policies], prompts, 4)
    repeated = [p for p in prompts for _ in range(4)]
    answers = [[t for texts in g.texts for t in texts] for g in gens]
    return [mean(scores) for scores in score_each(cfg, rm, repeated, answers)]


@pytest.mark.parametrize("mode", ["grpo", "rloo"])
def test_online_e_step_raises_the_rms_mean_score_on_its_prompts(fresh_run, mode):
    run = fresh_run
    cfg = prepare_run(None, [f"e_step.mode={mode}", *ONLINE], run)
    run_step("e-step", run, 1, cfg)
    result = rundir.read_done(run, 1, "e-step")
    m = result["metrics"]
    start, rm = run / result["inputs"]["policy"], run / result["inputs"]["rm"]
    prompts = list(policy_batch(cfg, run, datasets.load_from_disk(str(run / "iter_0/init/data/prompts")), 1)["prompt"])
    before, after = rm_mean_score(cfg, run, [start, run / result["outputs"]["policy"]], rm, prompts)
    # Measured with the same RM and seed: 0.217 -> 0.394 (grpo) and 0.461 (rloo).
    assert after > before + 0.1, (before, after)
    # The rollouts came from our backend (HF generate on the CPU), not trl's generate.
    assert m["rollout/backend"] == "hf (auto: no CUDA)" and m["rollout/seconds"] > 0
    assert m[f"{mode}/prompts"] == len(prompts) and m[f"{mode}/steps"] == 52
    assert m[f"{mode}/rewards/rm_score/mean_last"] > m[f"{mode}/rewards/rm_score/mean_first"]
    # Selection and its tau stop as in DPO mode; the M-step gets the policies, and no pairs.
    assert m["select/best_checkpoint"] == Path(result["outputs"]["policy"]).name and not m["select/stopped"]
    assert "pairs" not in result["outputs"]


# On a GPU the engine replays CUDA graphs captured at the first rollout, over the trainer's tensors.
@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)],  # gpu: skipped without CUDA (conftest)
)
def test_static_engine_rollouts_sample_the_trainers_current_weights(prepared_run, tmp_path, device):
    run = prepared_run
    cfg = load_config(None, ["e_step.mode=grpo", "generation.backend=static", f"device={device}", *ONLINE], run)
    prompts = list(
        datasets.load_from_disk(str(run / "iter_0/init/data/prompts")).filter(lambda r: r["split"] == "policy")[
            "prompt"
        ][:12]
    )
    policy, rm = (rundir.latest_output(run, key, iteration_max=0) for key in ("policy", "rm"))
    trainer = online.make_trainer(cfg, policy, rm, prompts, 0, tmp_path)
    tok, params = trainer.processing_class, sampling_params(cfg, 2, seed=123)
    ids = [tok(policy_prompt_text(tok, p), add_special_tokens=False)["input_ids"] for p in prompts[:8]]

    # The engine computes in trl's autocast dtype: bf16 on a GPU, none (fp32) on the CPU.
    autocast = torch.bfloat16 if trainer.args.bf16 else None

    def fresh_engine_samples():
        return StaticGraphBackend(copy.deepcopy(trainer.model), tok, dtype=autocast).generate_ids(ids, params)[0]

    at_start, seen = fresh_engine_samples(), {}

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                seen["engine"], seen["fresh"] = trainer.engine.generate_ids(ids, params)[0], fresh_engine_samples()
                engine_w, own = trainer.engine.w.o_w[0], trainer.model.model.layers[0].self_attn.o_proj.weight
                # Unfused tensors are the module's own, read in place; under autocast, casts made on the device.
                seen["read"] = (
                    engine_w.data_ptr() == own.data_ptr() if autocast is None else engine_w.device == own.device
                )

    trainer.add_callback(Probe())
    trainer.train()
    assert trainer.rollout_stats["backend"] == "static (generation.backend)"
    # The engine built at the first rollout samples the weights as they are four updates later...
    assert seen["engine"] == seen["fresh"] and seen["read"]
    # ...which training has moved away from the start's.
    assert seen["engine"] != at_start


@pytest.mark.integration  # a whole tiny loop in its own processes
def test_coevolve_run_completes_the_tiny_loop_with_the_online_e_step(tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "coevolve",
        "run",
        "--config",
        str(TINY),
        "--run-dir",
        str(run),
        *FAST,
        "iterations=1",
        "e_step.mode=grpo",
        "e_step.prompts_per_iteration=24",
        "e_step.online.kl=0.05",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    e_step, m_step = rundir.read_done(run, 1, "e-step"), rundir.read_done(run, 1, "m-step")
    assert e_step["metrics"]["grpo/prompts"] == 24
    # A KL weight loads trl's reference, the iteration's start, and its KL is logged.
    assert "grpo/kl_last" in e_step["metrics"]
    assert m_step["inputs"]["policy_new"] == e_step["outputs"]["policy"]
    assert m_step["inputs"]["policy_old"] == e_step["inputs"]["policy"]
