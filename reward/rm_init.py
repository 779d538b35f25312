"""Step `rm-init` (iteration 0, optional): train the base RM on the original preference pairs with
trl's RewardTrainer (Bradley-Terry); held-out pairs measure it. The RM starts from init's, or with
`rm.from_policy` from the policy as it stands here (after sft-warmup) with a new score head.

pairs   only with `data.pair_source: policy`: the "human" pairs are two samples per prompt from the
        starting policy (after sft-warmup), labelled by Bradley-Terry on the task's gold reward; they
        become the run's original pairs (train / held-out), as init's would
before  accuracy of the untrained RM on the held-out and train pairs
train   Bradley-Terry with trl's RewardTrainer
after   accuracy of the trained RM
"""

from __future__ import annotations

import random
from pathlib import Path
from statistics import mean

import datasets
from coevolve.data.records import original_pair_records, split_pairs
from coevolve.data.tasks import load_task
from coevolve.reward.training import accuracy_phase, train_rm

from coevolve.core import rundir
from coevolve.core.rollout import sample
from coevolve.core.step import StepRun


def sample_pairs(step: StepRun, policy: Path, tmp: Path) -> dict:
    cfg, data = step.cfg, step.cfg.data
    task = load_task(data.task)
    prompts = task.pair_prompts(data.num_pairs, data.seed)
    gens = sample(cfg, policy, prompts, 2, cfg.seed * 1000 + 300, "generate: policy_0")
    rows = task.label_pairs(prompts, gens.texts, data.label_temperature, data.seed)
    if not rows:
        raise RuntimeError(
            f"rm-init: the starting policy gave no two distinct responses on any of {len(prompts)} prompts; no pairs to label"
        )
    pairs = split_pairs(datasets.Dataset.from_list(rows), data.heldout_pairs, random.Random(f"pair-split-{data.seed}"))
    pairs.save_to_disk(str(tmp))
    step.store().append("pairs", 0, original_pair_records(pairs, step.name))
    return {
        "pairs/prompts": len(prompts),
        "pairs/labelled": len(rows),
        "pairs/heldout": pairs["split"].count("heldout"),
        "pairs/label_agrees_with_gold": mean(r["chosen_gold"] > r["rejected_gold"] for r in rows),
        "pairs/gold_gap_mean": mean(abs(r["chosen_gold"] - r["rejected_gold"]) for r in rows),
    }


def main(step: StepRun) -> dict:
    here = (step.iteration, step.name)
    cfg = step.cfg
    if cfg.rm.from_policy or cfg.data.pair_source == "policy":
        policy = step.inputs["policy"] = rundir.require_output(step.run_dir, "policy", here)
    rm = step.inputs["rm"] = policy if cfg.rm.from_policy else rundir.require_output(step.run_dir, "rm", here)
    outputs = {"rm": "train/rm"}
    if cfg.data.pair_source == "policy":
        pairs_path = step.phase("pairs", lambda tmp: sample_pairs(step, policy, tmp))
        outputs["pairs"] = "pairs"
    else:
        pairs_path = step.inputs["pairs"] = rundir.require_output(step.run_dir, "pairs", here)
    pairs = datasets.load_from_disk(str(pairs_path))
    train_pairs = pairs.filter(lambda r: r["split"] == "train")
    heldout = pairs.filter(lambda r: r["split"] == "heldout")

    step.phase("before", lambda tmp: accuracy_phase(step, rm, {"heldout": heldout, "train": train_pairs}, "rm_before"))
    step.phase("train", lambda tmp: train_rm(step, rm, train_pairs, cfg.rm_init, tmp))
    step.phase(
        "after",
        lambda tmp: accuracy_phase(
            step, step.path("train") / "rm", {"heldout": heldout, "train": train_pairs}, "rm_after"
        ),
    )
    return step.finish(outputs)
