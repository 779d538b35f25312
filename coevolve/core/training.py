"""What every trl-trained step shares: the trainer config built from ours, and the training log kept."""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import torch
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

from coevolve.core import tracking
from coevolve.core.chat import completion_example
from coevolve.core.config import Config, TrainConfig
from coevolve.core.models import device_of


def trainer_args(config_cls, train: TrainConfig, cfg: Config, output_dir: Path, **fields):
    """A trl `*Config` from our TrainConfig; `fields` are the step's own (beta, save_steps, ...) and
    `train.extra` passes any other trl/transformers field through unchanged."""
    device = device_of(cfg)
    bf16 = train.bf16 if train.bf16 is not None else device == "cuda" and torch.cuda.is_bf16_supported()
    args = dict(
        output_dir=str(output_dir),
        learning_rate=train.learning_rate,
        num_train_epochs=train.num_train_epochs,
        per_device_train_batch_size=train.per_device_train_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        lr_scheduler_type=train.lr_scheduler_type,
        # transformers 5 reads a float below 1 as a ratio of the total steps.
        warmup_steps=train.warmup_ratio,
        max_length=train.max_length,
        gradient_checkpointing=train.gradient_checkpointing,
        bf16=bf16,
        logging_steps=train.logging_steps,
        save_strategy="no",
        # TRL's WandbCallback logs into the step's own W&B run (core/tracking.py); it writes the
        # trainer's run_name over the run's config, so the two must agree.
        report_to="wandb" if tracking.active() else "none",
        run_name=cfg.run_name,
        seed=cfg.seed,
        use_cpu=device == "cpu",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    args.update(fields)
    args.update(train.extra)
    return config_cls(**args)


def keep_log(trainer, out: Path, prefix: str) -> dict:
    """Write the trainer's log history as jsonl and return first/last values of its loss-like metrics."""
    history = [h for h in trainer.state.log_history if "loss" in h or any(k.startswith("rewards/") for k in h)]
    out.write_text("".join(json.dumps(h) + "\n" for h in trainer.state.log_history))
    metrics = {f"{prefix}/steps": trainer.state.global_step}
    keys = sorted({k for h in history for k in h if k not in ("epoch", "step", "learning_rate", "grad_norm")})
    for key in keys:
        values = [h[key] for h in history if key in h]
        metrics[f"{prefix}/{key}_first"] = float(values[0])
        metrics[f"{prefix}/{key}_last"] = float(values[-1])
    return metrics


def train_sft(cfg: Config, start: Path, rows, train: TrainConfig, output_dir: Path, **fields) -> SFTTrainer:
    """trl's SFTTrainer from `start`, trained on rows of prompt and completion; `fields` go to its
    SFTConfig. Also used by the reviser and by E-step mode seft."""
    tok = AutoTokenizer.from_pretrained(start)
    train_set = datasets.Dataset.from_list([completion_example(tok, r["prompt"], r["completion"]) for r in rows])
    args = trainer_args(SFTConfig, train, cfg, output_dir, **fields)
    trainer = SFTTrainer(model=str(start), args=args, train_dataset=train_set, processing_class=tok)
    trainer.train()
    return trainer
