"""A step reads each model folder once (core/loaded.py): the policy that sampled is DPO's start and
reference and selection's baseline, the RM that scored serves the whole step, and the checkpoints a
step writes are not read back."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from coevolve.core.config import load_config
from coevolve.core.loaded import Loaded

ROOT = Path(__file__).resolve().parents[1]


def io_of(run, step: str) -> dict:
    done = json.loads((run / "iter_1" / step / "DONE.json").read_text())
    return {phase: (io["loads"], io["saves"]) for phase, io in done["io"].items()}


def test_a_step_reads_each_model_folder_once_and_saves_each_checkpoint_once(iterated_run):
    e_step, m_step = io_of(iterated_run, "e-step"), io_of(iterated_run, "m-step")
    candidates = len(json.loads((iterated_run / "iter_1/e-step/DONE.json").read_text())["metrics"]["select/win_rates"])
    assert candidates > 1
    # (loads, saves) by phase. A tokenizer loads once per process (models.load_tokenizer): a phase's
    # first model counts 2 where this process had not loaded its tokenizer yet, else 1.
    # The e-step: the policy once to sample (then DPO's start, its reference and selection's baseline),
    # the RM once to score (and to judge selection); each candidate written once and never read.
    assert e_step["generate"] in {(1, 0), (2, 0)} and e_step["score"] in {(1, 0), (2, 0)}
    assert (e_step["pairs"], e_step["train"], e_step["select"]) == ((0, 0), (0, candidates), (0, 0))
    # The m-step: policy_K and policy_K-1's weights to sample; rm_K-1 once, which is also the training's
    # start at iteration 1 (the base RM) and the `before` RM; the trained RM saved once (with its
    # tokenizer), measured `after` as it is in memory.
    assert m_step["generate"] in {(2, 0), (3, 0)} and m_step["score"] in {(1, 0), (2, 0)}
    assert [m_step[p] for p in ("pseudo", "mix", "train", "before", "after")] == [
        (0, 0),
        (0, 0),
        (0, 1),
        (0, 0),
        (0, 0),
    ]


def test_a_kept_checkpoint_is_what_reading_its_file_gives(iterated_run):
    """Selection samples the candidates from the weights the step wrote, cast to `policy.dtype` as
    `from_pretrained` casts the file's."""
    checkpoint = iterated_run / json.loads((iterated_run / "iter_1/e-step/DONE.json").read_text())["outputs"]["policy"]
    written = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).state_dict()
    cfg = load_config(iterated_run / "config.yaml", ["policy.dtype=bfloat16"])
    models = Loaded(cfg)
    models.wrote_policy(checkpoint.parent / "elsewhere.tmp", written)
    models.moved(checkpoint.parent / "elsewhere.tmp", checkpoint)
    kept = models.weights(checkpoint, torch.bfloat16)
    read = Loaded(cfg).weights(checkpoint, torch.bfloat16)
    assert kept is not read and kept.keys() == read.keys()
    assert all(kept[k].dtype == torch.bfloat16 and torch.equal(kept[k], read[k]) for k in read)


def test_bench_iteration_records_each_steps_loads_and_saves(iterated_run):
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_iteration import ours_io

    io = ours_io(iterated_run)
    e_step = json.loads((iterated_run / "iter_1/e-step/DONE.json").read_text())
    # As counted above: the policy and the RM (with their tokenizers, where not loaded before), each
    # candidate saved once; the m-step's two policies and its RM, and the trained RM saved once.
    assert 2 <= io["e-step"]["loads"] <= 4 and io["e-step"]["saves"] == len(e_step["metrics"]["select/win_rates"])
    assert 3 <= io["m-step"]["loads"] <= 5 and io["m-step"]["saves"] == 1
    assert io["e-step"]["load_s"] == round(sum(phase["load_s"] for phase in e_step["io"].values()), 3)
