"""A step reads each model folder once (core/loaded.py): the policy that sampled is DPO's start and
reference and selection's baseline, the RM that scored serves the whole step, and the checkpoints a
step writes are not read back."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from coevolve.core.config import load_config
from coevolve.core.loaded import Loaded


def io_of(run, step: str) -> dict:
    done = json.loads((run / "iter_1" / step / "DONE.json").read_text())
    return {phase: (io["loads"], io["saves"]) for phase, io in done["io"].items()}


def test_a_step_reads_each_model_folder_once_and_saves_each_checkpoint_once(iterated_run):
    # Tokenizers are loaded once per process (models.load_tokenizer); this one loaded them all before.
    e_step = json.loads((iterated_run / "iter_1/e-step/DONE.json").read_text())
    candidates = len(e_step["metrics"]["select/win_rates"])
    assert candidates > 1
    # (loads, saves) by phase. The policy once to sample (then DPO's start, its reference and selection's
    # baseline), the RM once to score (and to judge selection), each candidate written once, read never.
    assert io_of(iterated_run, "e-step") == {
        "generate": (1, 0),
        "score": (1, 0),
        "pairs": (0, 0),
        "train": (0, candidates),
        "select": (0, 0),
    }
    # policy_K (the e-step's pick) and policy_K-1's weights to sample; rm_K-1 once, which is also the
    # training's start at iteration 1 (the base RM); the trained RM, saved with its tokenizer, measured
    # as it is in memory.
    assert io_of(iterated_run, "m-step") == {
        "generate": (2, 0),
        "score": (1, 0),
        "pseudo": (0, 0),
        "mix": (0, 0),
        "train": (0, 2),
        "before": (0, 0),
        "after": (0, 0),
    }


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
