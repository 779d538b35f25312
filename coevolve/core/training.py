"""What every trl-trained step shares: the trainer config built from ours, and the training log kept."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import datasets
import torch
from transformers import AutoConfig
from trl import SFTConfig, SFTTrainer

from coevolve.core import compile_cache, loaded, tracking
from coevolve.core.chat import completion_example, preference_example
from coevolve.core.checkpoints import BackgroundCheckpoints
from coevolve.core.config import Config, ConfigError, TrainConfig
from coevolve.core.models import device_of, load_tokenizer, whole_weights

log = logging.getLogger("coevolve")
# Fewer optimizer steps than this in a training phase is almost always a batch-size mistake (e.g.
# the paper's accumulation of 8 or 16 left on a few hundred pairs), so the step log says so.
FEW_STEPS = 5


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
        # Under several processes: every parameter gets a gradient, so DDP need not walk the graph for
        # unused ones after each backward (transformers' default when not checkpointing).
        ddp_find_unused_parameters=False,
    )
    # GRPO's and RLOO's configs have none: their sequences are as long as the rollouts.
    names = {f.name for f in dataclasses.fields(config_cls)} if dataclasses.is_dataclass(config_cls) else None
    if names is None or "max_length" in names:
        args["max_length"] = train.max_length
    if train.compile:
        args["torch_compile"] = True
        if names is None or "pad_to_multiple_of" in names:
            args["pad_to_multiple_of"] = compile_cache.PAD_MULTIPLE
        log.info(f"torch.compile on; its caches in {compile_cache.in_use() or 'torch default folders'}")
    if train.group_by_length:
        # The sampler reads the `length` column of preference_dataset; trl's collators ignore it.
        args.update(train_sampling_strategy="group_by_length", remove_unused_columns=False)
    args.update(fields)
    args.update(train.extra)
    return config_cls(**args)


def preference_dataset(tok, pairs, train: TrainConfig, for_rm: bool) -> datasets.Dataset:
    """trl preference rows for `pairs` (prompt/chosen/rejected) in the tokenizer's format; with
    `train.group_by_length`, a `length` column to group by: characters of the prompt and the longer
    response (the sampler needs the order, not the unit)."""
    rows = [preference_example(tok, p["prompt"], p["chosen"], p["rejected"], for_rm) for p in pairs]
    if train.group_by_length:
        for row, p in zip(rows, pairs):
            row["length"] = len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"]))
    return datasets.Dataset.from_list(rows)


def keep_log(trainer, out: Path, prefix: str) -> dict:
    """Write the trainer's log history as jsonl and return first/last values of its loss-like metrics."""
    history = [h for h in trainer.state.log_history if "loss" in h or any(k.startswith("rewards/") for k in h)]
    # The trainer made the folder on the main process only; under several, the others write here too.
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(h) + "\n" for h in trainer.state.log_history))
    steps, a = trainer.state.global_step, trainer.args
    if steps < FEW_STEPS:
        log.warning(
            f"{prefix}: only {steps} optimizer step(s), each of {a.per_device_train_batch_size} x {a.gradient_accumulation_steps} "
            f"(per device x gradient_accumulation_steps) x {a.world_size} process(es); lower them for more steps"
        )
    metrics = {f"{prefix}/steps": steps, f"{prefix}/compiled": bool(a.torch_compile)}
    if a.torch_compile:
        # With a warm cache (an earlier step process on this machine compiled these shapes): hits, few seconds.
        metrics.update({f"{prefix}/{k}": v for k, v in compile_cache.stats().items()})
        if compile_cache.in_use() is not None:
            metrics[f"{prefix}/compile_cache"] = str(compile_cache.in_use())
    keys = sorted({k for h in history for k in h if k not in ("epoch", "step", "learning_rate", "grad_norm")})
    for key in keys:
        values = [h[key] for h in history if key in h]
        metrics[f"{prefix}/{key}_first"] = float(values[0])
        metrics[f"{prefix}/{key}_last"] = float(values[-1])
    return metrics


def lora_config(train: TrainConfig, start: Path, task_type: str):
    """The peft LoraConfig for `train.lora` (None without it); `task_type` is CAUSAL_LM or SEQ_CLS
    (which also trains the RM's score head in full)."""
    if train.lora is None:
        return None
    try:
        from peft import LoraConfig
    except ImportError:
        raise ConfigError("a training config's `lora` needs peft: pip install 'coevolve[lora]'") from None
    lora = train.lora
    targets, layers = lora.target_modules, None
    if lora.top_layers is not None:
        config = AutoConfig.from_pretrained(start)
        n = config.num_hidden_layers
        layers = list(range(max(0, n - lora.top_layers), n))
        if isinstance(targets, str):  # peft takes layers_to_transform only with a list of names
            targets, layers = _linear_modules(config, task_type, layers, start), None
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        layers_to_transform=layers,
        task_type=task_type,
    )


def _linear_modules(config, task_type: str, layers: list[int], start: Path) -> list[str]:
    """Full names of the linear modules inside the given transformer layers, read off a weightless copy
    of the model `config` describes (`start`: where it came from, for the error message)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if task_type == "SEQ_CLS" else AutoModelForCausalLM
    with torch.device("meta"), whole_weights():
        model = cls.from_config(config)
    wanted = {str(i) for i in layers}
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and (m := re.search(r"\.(?:layers|h|blocks|layer)\.(\d+)\.", name))
        and m.group(1) in wanted
    ]
    if not names:
        raise ConfigError(
            f"lora.top_layers: found no linear modules in layers {layers} of {start}; name lora.target_modules"
        )
    return names


def start_model(path: Path, role: str, args):
    """What a trl trainer (`args`: its config) starts from: a copy of the `role` model the step holds from
    `path` (core/loaded.py), where it holds it as trl would load it (float32, trl's default, with no
    `model_init_kwargs`); else the folder, for trl to read."""
    model = loaded.copy_of(path, role, torch.float32) if args.model_init_kwargs is None else None
    return str(path) if model is None else model


def save_trained(trainer, path: Path) -> None:
    """The trained model as a plain checkpoint, LoRA adapters merged in, with its tokenizer (the
    trainer saves its processing class with the model). Every process calls it: under ZeRO-3 the
    trainer gathers the weights from all of them to save."""
    trainer.save_model(str(path))
    if trainer.is_world_process_zero():
        merge_adapter_checkpoint(path)


def merge_adapter_checkpoint(path: Path) -> None:
    """A checkpoint the trainer saved as LoRA adapters only, rewritten as the merged model."""
    if not (path / "adapter_config.json").exists():
        return
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

    task = json.loads((path / "adapter_config.json").read_text()).get("task_type")
    cls = AutoPeftModelForSequenceClassification if task == "SEQ_CLS" else AutoPeftModelForCausalLM
    with whole_weights():
        merged = cls.from_pretrained(path).merge_and_unload()
    for adapter_file in path.glob("adapter_*"):
        adapter_file.unlink()
    merged.save_pretrained(path)
    # What the step's later phases would read back: selection's candidates, the trained RM (core/loaded.py).
    if task == "SEQ_CLS":
        loaded.wrote_rm(path, merged, load_tokenizer(path))
    else:
        loaded.wrote_policy(path, merged.state_dict())


def train_sft(
    cfg: Config, start: Path, rows, train: TrainConfig, output_dir: Path, save_every: int | None = None
) -> SFTTrainer:
    """trl's SFTTrainer from `start`, trained on rows of prompt and completion; with `save_every`, a
    checkpoint in `output_dir` every that many steps and at the end. Also used by the reviser and by
    E-step mode seft."""
    tok = load_tokenizer(start)
    train_set = datasets.Dataset.from_list([completion_example(tok, r["prompt"], r["completion"]) for r in rows])
    args = trainer_args(SFTConfig, train, cfg, output_dir)
    trainer = SFTTrainer(
        model=start_model(start, "policy", args),
        args=args,
        train_dataset=train_set,
        processing_class=tok,
        peft_config=lora_config(train, start, "CAUSAL_LM"),
    )
    checkpoints = BackgroundCheckpoints(trainer, output_dir, save_every) if save_every else None
    trainer.train()
    if checkpoints:
        checkpoints.finish()
    return trainer
