"""RM training and RM accuracy, shared by `rm-init` and `m-step`."""
from __future__ import annotations

from pathlib import Path

import datasets
from transformers import AutoTokenizer
from trl import RewardConfig, RewardTrainer

from coevolve.core.config import TrainConfig
from coevolve.core.models import load_rm
from coevolve.core.scoring import RewardScorer, win_rate
from coevolve.core.step import Progress, StepRun
from coevolve.core.training import keep_log, lora_config, preference_dataset, save_trained, trainer_args


def train_rm(step: StepRun, start_from: Path, pairs: datasets.Dataset, train: TrainConfig, tmp: Path) -> dict:
    """Bradley-Terry training from `start_from` on rows with prompt/chosen/rejected; saves tmp/rm."""
    tok = AutoTokenizer.from_pretrained(start_from)
    rows = preference_dataset(tok, pairs, train, for_rm=True)
    args = trainer_args(RewardConfig, train, step.cfg, tmp / "trainer")
    trainer = RewardTrainer(model=str(start_from), args=args, train_dataset=rows, processing_class=tok,
                            peft_config=lora_config(train, start_from, "SEQ_CLS"))
    trainer.train()
    save_trained(trainer, tmp / "rm")
    return {"rm_train/pairs": len(rows), **keep_log(trainer, tmp / "train_log.jsonl", "rm_train")}


def pair_accuracy(scorer: RewardScorer, pairs: datasets.Dataset) -> float:
    """Share of pairs where the RM scores chosen above rejected; a tie counts half."""
    if len(pairs) == 0:
        return float("nan")
    prompts = list(pairs["prompt"])
    return win_rate(scorer.score(prompts, list(pairs["chosen"])), scorer.score(prompts, list(pairs["rejected"])))


def accuracy_phase(step: StepRun, rm: Path, sets: dict[str, datasets.Dataset], prefix: str) -> dict:
    model, tok = load_rm(rm, step.cfg)
    scorer = RewardScorer(model, tok, step.cfg.generation.batch_size, progress=Progress(f"{prefix} accuracy", 0))
    return {f"{prefix}/accuracy_{name}": pair_accuracy(scorer, pairs) for name, pairs in sets.items()}
