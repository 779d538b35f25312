"""Steps under a multi-process launcher (issue 10, what CPUs allow): each process samples and scores its
share of the prompts, the shares come back whole, and only the main process writes the run directory.
A 2-process run goes through `accelerate launch` with gloo, as `coevolve run` starts it on 2 GPUs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from coevolve.data.store import Store

from coevolve.cli import run_step
from coevolve.core import distributed, rundir
from coevolve.core.config import prepare_run
from coevolve.core.launch import step_command

ROOT = Path(__file__).resolve().parents[1]
# `static` keys every sample by its prompt's index in the whole list, so 2 shares sample what 1 process does.
STATIC = ["generation.backend=static"]


@pytest.mark.parametrize("n", range(8))
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_shares_cover_every_item_once_in_order(monkeypatch, n, size):
    shares = []
    for r in range(size):
        monkeypatch.setenv("RANK", str(r))
        monkeypatch.setenv("WORLD_SIZE", str(size))
        shares.append(distributed.share(n))
    assert [i for s in shares for i in s] == list(range(n))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_only_the_main_process_saves_the_config(monkeypatch, prepared_run, tmp_path):
    # Every process of a launched step resolves the config; two writing it raced on config.tmp.
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    before = (run / "config.yaml").read_text()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert prepare_run(None, ["e_step.beta=0.3"], run).e_step.beta == 0.3
    assert (run / "config.yaml").read_text() == before and not (run / "config.tmp").exists()
    monkeypatch.setenv("RANK", "0")
    prepare_run(None, ["e_step.beta=0.3"], run)
    assert "beta: 0.3" in (run / "config.yaml").read_text()


@pytest.fixture(scope="module")
def one_and_two(prepared_run, tmp_path_factory):
    """Iteration 1 (e-step, m-step) of the prepared run, once in 1 process and once in 2."""
    runs = {}
    for processes in (1, 2):
        run = tmp_path_factory.mktemp(f"processes{processes}") / "run"
        shutil.copytree(prepared_run, run)
        cfg = prepare_run(None, STATIC, run)
        for name in ("e-step", "m-step"):
            if processes == 1:
                run_step(name, run, 1, cfg)
                continue
            launched = cfg.model_copy(
                update={"launch": cfg.launch.model_copy(update={"launcher": "accelerate", "gpus": 2})}
            )
            cmd = step_command(launched, name, run, 1)
            done = subprocess.run(
                cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
            )
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            runs["log"] = runs.get("log", "") + done.stdout + done.stderr
        runs[processes] = run
    return runs


@pytest.mark.slow
def test_two_processes_write_the_pairs_one_process_writes(one_and_two):
    one, two = one_and_two[1], one_and_two[2]
    columns = ["prompt_id", "chosen", "rejected"]
    pairs = [
        datasets.load_from_disk(str(run / "iter_1/e-step/pairs/pairs")).select_columns(columns).to_list()
        for run in (one, two)
    ]
    assert len(pairs[0]) > 0 and pairs[0] == pairs[1]
    samples = [datasets.load_from_disk(str(run / "iter_1/e-step/score")) for run in (one, two)]
    assert samples[0]["response"] == samples[1]["response"]
    assert samples[0]["score"] == pytest.approx(samples[1]["score"], abs=1e-4)
    # DDP splits each batch of pairs in two: half the steps, and model selection judged every checkpoint
    # the main process saved (e_step.save_steps=2), the last included.
    steps = [rundir.read_done(run, 1, "e-step")["metrics"]["dpo/steps"] for run in (one, two)]
    assert steps[1] == (steps[0] + 1) // 2
    candidates = datasets.load_from_disk(str(two / "iter_1/e-step/select/candidates"))["checkpoint"]
    assert sorted(candidates) == sorted({f"checkpoint-{s}" for s in [*range(2, steps[1] + 1, 2), steps[1]]})


@pytest.mark.slow
def test_two_processes_leave_one_complete_run_directory(one_and_two):
    one, two = one_and_two[1], one_and_two[2]
    for name in ("e-step", "m-step"):
        done = rundir.read_done(two, 1, name)
        assert set(done["outputs"]) == set(rundir.read_done(one, 1, name)["outputs"])
        # No other process's scratch folder, and no step left half-written.
        leftovers = [p.name for p in (two / "iter_1").iterdir() if p.name.startswith(".") or ".rank" in p.name]
        assert not leftovers and not list((two / "iter_1" / name).glob("*.rank*"))
    rm = rundir.latest_output(two, "rm")
    assert (rm / "model.safetensors").exists()
    pseudo = datasets.load_from_disk(str(two / "iter_1/m-step/pseudo/kept"))
    assert len(set(pseudo["prompt_id"])) == len(pseudo) > 0
    # The stores were written once, by the main process: as many rows as one process writes, no duplicate.
    for kind in ("responses", "pairs", "pseudo_pairs"):
        rows = [Store(run).load(kind, [1]) for run in (one, two)]
        assert len(rows[1]) == len(rows[0]) > 0
    # Progress is reported once, by the main process.
    log = one_and_two["log"]
    assert (
        log.count("iteration 1 e-step: finished")
        == log.count("iteration 1 m-step: finished")
        == log.count("pairs: done in")
        == 1
    )


SHARES_SCRIPT = """
import json, sys
from pathlib import Path
from coevolve.core import distributed, rundir
from coevolve.core.config import load_config
from coevolve.core.rollout import sample_each, score_each
run, lists, out = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
distributed.init()
cfg = load_config(run / "config.yaml", ["generation.backend=static"])
results = []
for prompts in lists:
    gens = sample_each(cfg, [(rundir.latest_output(run, "policy"), 7, "sample")], prompts, 2)[0]
    scores = score_each(cfg, rundir.latest_output(run, "rm"), prompts, [[t[0] for t in gens.texts]])[0]
    results.append({"texts": gens.texts, "scores": scores})
if distributed.is_main():
    Path(out).write_text(json.dumps(results))
distributed.finish()
"""


def test_uneven_shares_come_back_whole_and_in_order(prepared_run, tmp_path):
    from coevolve.core.config import load_config
    from coevolve.core.rollout import sample_each, score_each

    # One prompt (fewer than processes) and three (shares of 1 and 2), in one launch.
    prompts = [f"list {word} animals" for word in ("two", "three", "four")]
    lists = [prompts[:1], prompts]
    script = tmp_path / "shares.py"
    script.write_text(SHARES_SCRIPT)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        str(script),
        str(prepared_run),
        json.dumps(lists),
        str(tmp_path / "out.json"),
    ]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    cfg = load_config(prepared_run / "config.yaml", ["generation.backend=static"])
    for prompts, two in zip(lists, json.loads((tmp_path / "out.json").read_text()), strict=True):
        gens = sample_each(cfg, [(rundir.latest_output(prepared_run, "policy"), 7, "sample")], prompts, 2)[0]
        assert two["texts"] == gens.texts and len(gens.texts) == len(prompts)
        scores = score_each(cfg, rundir.latest_output(prepared_run, "rm"), prompts, [[t[0] for t in gens.texts]])[0]
        assert two["scores"] == pytest.approx(scores, abs=1e-4)


@pytest.mark.slow
def test_zero3_trains_and_hands_on_whole_models(prepared_run, tmp_path):
    # Under ZeRO-3 transformers partitions every model loaded once a trainer exists: sampling, scoring and
    # the LoRA merge must still see whole models, and the saved checkpoints must be whole. LoRA only: full
    # training goes through the same gathered save, and a second 2-minute run would push the suite past
    # its 15 minutes.
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    cfg = prepare_run(None, ["e_step.train.lora.top_layers=1", "m_step.train.lora.top_layers=1"], run)
    zero3 = cfg.launch.model_copy(
        update={"launcher": "accelerate", "gpus": 2, "deepspeed_config": str(ROOT / "configs/deepspeed/zero3.json")}
    )
    for name in ("e-step", "m-step"):
        cmd = step_command(cfg.model_copy(update={"launch": zero3}), name, run, 1)
        done = subprocess.run(
            cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for kind, cls in (("policy", AutoModelForCausalLM), ("rm", AutoModelForSequenceClassification)):
        before, after = (cls.from_pretrained(rundir.latest_output(run, kind, iteration_max=k)) for k in (0, 1))
        assert not list(rundir.latest_output(run, kind).glob("adapter_*"))
        pairs = list(zip(before.state_dict().values(), after.state_dict().values(), strict=True))
        assert all(a.shape == b.shape for a, b in pairs) and any((a != b).any() for a, b in pairs)
    metrics = rundir.read_done(run, 1, "m-step")["metrics"]
    assert metrics["rm_after/accuracy_train_mix"] >= metrics["rm_before/accuracy_train_mix"]
