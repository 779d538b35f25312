"""RM training and RM accuracy, shared by `rm-init` and `m-step`."""

from __future__ import annotations

from pathlib import Path

import datasets
from trl import RewardConfig, RewardTrainer

from coevolve.core import loaded
from coevolve.core.config import TrainConfig
from coevolve.core.models import load_tokenizer
from coevolve.core.rollout import score_each
from coevolve.core.scoring import win_rate
from coevolve.core.step import StepRun
from coevolve.core.training import (
    keep_log,
    lora_config,
    preference_dataset,
    save_trained,
    start_model,
    trainer_args,
)


def train_rm(step: StepRun, start_from: Path, pairs: datasets.Dataset, train: TrainConfig, tmp: Path) -> dict:
    """Bradley-Terry training from `start_from` on rows with prompt/chosen/rejected; saves tmp/rm."""
    tok = load_tokenizer(start_from)
    rows = preference_dataset(tok, pairs, train, for_rm=True)
    args = trainer_args(RewardConfig, train, step.cfg, tmp / "trainer")
    trainer = RewardTrainer(
        model=start_model(start_from, "rm", args),
        args=args,
        train_dataset=rows,
        processing_class=tok,
        peft_config=lora_config(train, start_from, "SEQ_CLS"),
    )
    trainer.train()
    save_trained(trainer, tmp / "rm")
    # The `after` measurement scores with it as trained, not wrapped for mixed precision or compiled.
    loaded.wrote_rm(
        tmp / "rm",
        trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False, keep_torch_compile=False),
        tok,
    )
    return {"rm_train/pairs": len(rows), **keep_log(trainer, tmp / "train_log.jsonl", "rm_train")}


def accuracy_phase(step: StepRun, rm: Path, sets: dict[str, datasets.Dataset], prefix: str) -> dict:
    """Per set, the share of pairs where the RM scores chosen above rejected (a tie counts half; nan for
    an empty set); every set's chosen and rejected responses are scored in one pass of one RM load."""
    column = lambda name: [text for pairs in sets.values() for text in pairs[name]]  # noqa: E731
    chosen, rejected = score_each(
        step.cfg, rm, column("prompt"), [column("chosen"), column("rejected")], f"{prefix} accuracy"
    )
    metrics, start = {}, 0
    for name, pairs in sets.items():
        end = start + len(pairs)
        metrics[f"{prefix}/accuracy_{name}"] = win_rate(chosen[start:end], rejected[start:end])
        start = end
    return metrics
