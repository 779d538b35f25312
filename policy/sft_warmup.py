"""Step `sft-warmup` (iteration 0, optional): supervised fine-tuning of the starting policy on the
demonstrations, with trl's SFTTrainer (loss on the completion only)."""
from __future__ import annotations

import datasets
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

from coevolve.core import rundir
from coevolve.core.chat import completion_example
from coevolve.core.step import StepRun
from coevolve.core.training import keep_log, trainer_args


def main(step: StepRun) -> dict:
    here = (step.iteration, step.name)
    policy = step.inputs["policy"] = rundir.require_output(step.run_dir, "policy", here)
    demos = step.inputs["demos"] = rundir.require_output(step.run_dir, "demos", here)

    def train(tmp):
        tok = AutoTokenizer.from_pretrained(policy)
        rows = datasets.load_from_disk(str(demos))
        train_set = datasets.Dataset.from_list([completion_example(tok, r["prompt"], r["completion"]) for r in rows])
        args = trainer_args(SFTConfig, step.cfg.sft_warmup, step.cfg, tmp / "trainer")
        trainer = SFTTrainer(model=str(policy), args=args, train_dataset=train_set, processing_class=tok)
        trainer.train()
        trainer.save_model(str(tmp / "policy"))
        tok.save_pretrained(tmp / "policy")
        return keep_log(trainer, tmp / "train_log.jsonl", "sft")

    step.phase("train", train)
    return step.finish({"policy": "train/policy"})
