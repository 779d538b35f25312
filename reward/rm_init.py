"""Step `rm-init` (iteration 0, optional): train the base RM on the original preference pairs with
trl's RewardTrainer (Bradley-Terry); held-out pairs measure it."""
from __future__ import annotations

import datasets

from coevolve.core import rundir
from coevolve.core.step import StepRun
from coevolve.reward.training import accuracy_phase, train_rm


def main(step: StepRun) -> dict:
    here = (step.iteration, step.name)
    rm = step.inputs["rm"] = rundir.require_output(step.run_dir, "rm", here)
    pairs_path = step.inputs["pairs"] = rundir.require_output(step.run_dir, "pairs", here)
    pairs = datasets.load_from_disk(str(pairs_path))
    train_pairs = pairs.filter(lambda r: r["split"] == "train")
    heldout = pairs.filter(lambda r: r["split"] == "heldout")

    step.phase("before", lambda tmp: accuracy_phase(step, rm, {"heldout": heldout, "train": train_pairs}, "rm_before"))
    step.phase("train", lambda tmp: train_rm(step, rm, train_pairs, step.cfg.rm_init, tmp))
    step.phase("after", lambda tmp: accuracy_phase(step, step.path("train") / "rm", {"heldout": heldout, "train": train_pairs}, "rm_after"))
    return step.finish({"rm": "train/rm"})
