"""Step `sft-warmup` (iteration 0, optional): supervised fine-tuning of the starting policy on the
demonstrations, with trl's SFTTrainer (loss on the completion only)."""

from __future__ import annotations

import datasets

from coevolve.core import rundir
from coevolve.core.step import StepRun
from coevolve.core.training import keep_log, save_trained, train_sft


def main(step: StepRun) -> dict:
    here = (step.iteration, step.name)
    policy = step.inputs["policy"] = rundir.require_output(step.run_dir, "policy", here)
    demos = step.inputs["demos"] = rundir.require_output(step.run_dir, "demos", here)

    def train(tmp):
        trainer = train_sft(step.cfg, policy, datasets.load_from_disk(str(demos)), step.cfg.sft_warmup, tmp / "trainer")
        save_trained(trainer, tmp / "policy")
        return keep_log(trainer, tmp / "train_log.jsonl", "sft")

    step.phase("train", train)
    return step.finish({"policy": "train/policy"})
