"""E-step modes grpo and rloo: the policy trained online against the current RM, by trl's GRPOTrainer
or RLOOTrainer (their losses, advantages and KL as trl computes them).

Each batch of prompts is answered `e_step.num_samples` times by the policy as it is at that moment, the
RM scores each rollout re-rendered with its own template (policy and RM need not share a tokenizer),
and the trainer updates the policy on those rewards, optionally with a KL to the iteration's start
(`e_step.online.kl`, trl's beta). Checkpoints are written as in DPO mode, for model selection.

Rollouts go through coevolve's generation backend (`generation.backend`: the static engine on a GPU, HF
generate elsewhere), not trl's: both trainers are subclassed to override `_generate_single_turn`, the
one method that turns trl's tokenized prompts into completion ids. (GRPOTrainer's public `rollout_func`
hook would serve GRPO, but RLOOTrainer has none in this trl; one override serves both, and trl keeps
tokenizing the prompts, so the trained tokens are exactly those it built.) The backend samples the
trainer's own module: the static engine re-reads its tensors on the device before every call
(`Weights.refresh`), so the current weights are handed over without a copy to host.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import datasets
import torch
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from trl.models import unwrap_model_for_generation

from coevolve.core import loaded
from coevolve.core.chat import trl_prompt
from coevolve.core.checkpoints import BackgroundCheckpoints
from coevolve.core.config import Config
from coevolve.core.generation import Backend, backend_for
from coevolve.core.gold import gold_task
from coevolve.core.models import load_tokenizer
from coevolve.core.rollout import sampling_params
from coevolve.core.scoring import RewardScorer
from coevolve.core.training import keep_log, lora_config, trainer_args

log = logging.getLogger("coevolve")


class EngineRollouts:
    """Rollouts sampled by coevolve's generation backend from the trainer's current module."""

    # The trl trainer this is mixed into gives these.
    accelerator: Any
    model_wrapped: Any
    args: Any
    processing_class: Any
    engine: Backend | None
    rollout_stats: dict[str, Any]

    def use_engine(self, cfg: Config, seed: int) -> None:
        self.cfg, self.seed = cfg, seed
        self.engine = None
        self.rollout_calls = 0
        self.rollout_stats = {"seconds": 0.0, "tokens": 0, "backend": "", "fallback_draws": 0, "deferred_steps": 0}

    def top_p_fallback_share(self) -> float:
        """The share of the rollouts' tokens the static engine drew by its exact top-p fallback."""
        stats = self.rollout_stats
        return stats["fallback_draws"] / stats["tokens"] if stats["tokens"] else 0.0

    def engine_rollouts(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        """One completion per row of `prompt_ids` (trl repeats each prompt num_generations times). A seed of
        its own per call and process: rows of one prompt on several processes must not sample alike."""
        procs, rank = self.accelerator.num_processes, self.accelerator.process_index
        params = sampling_params(self.cfg, 1, self.seed + self.rollout_calls * procs + rank)
        self.rollout_calls += 1
        start = time.perf_counter()
        with (
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as model,
            torch.no_grad(),
        ):
            self.engine = engine = self.engine or self._make_engine(model)
            tokens, _, stats = engine.generate_ids(prompt_ids, params)
        self.rollout_stats["seconds"] += time.perf_counter() - start
        self.rollout_stats["tokens"] += sum(len(rows[0]) for rows in tokens)
        # The static engine's draws whose top-p nucleus did not fit its candidates, and its rows that waited.
        self.rollout_stats["fallback_draws"] += stats.get("truncated_steps", 0)
        self.rollout_stats["deferred_steps"] += stats.get("deferred_steps", 0)
        return [rows[0] for rows in tokens]

    def _make_engine(self, model):
        # Sampled in the dtype trl trains in (its fp32 weights under bf16 or fp16 autocast), not in fp32.
        autocast = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        engine, which = backend_for(self.cfg.generation, model, self.processing_class, autocast)
        log.info(f"online rollouts: generation backend {which}")
        self.rollout_stats["backend"] = which
        return engine


class GRPO(EngineRollouts, GRPOTrainer):
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        return self.engine_rollouts(prompt_ids), None  # no sampling log-probs: trl's loss takes its own


class RLOO(EngineRollouts, RLOOTrainer):
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
        return self.engine_rollouts(prompt_ids)


TRAINERS = {"grpo": (GRPO, GRPOConfig), "rloo": (RLOO, RLOOConfig)}


def rm_reward(cfg: Config, rm: Path):
    """The trainer's reward function: the RM's score of each rollout, the conversation re-rendered with
    the RM's own template as `rollout.score` does (or the gold reward, for the oracle RM)."""
    task = gold_task(rm)
    if task is not None:
        score = lambda prompts, responses: [task.gold(p, r) for p, r in zip(prompts, responses)]  # noqa: E731
    else:
        with loaded.current(cfg) as models:  # the step's RM, which then judges model selection too
            model, tok = models.rm(rm)
        score = RewardScorer(model, tok, cfg.generation.batch_size).score

    def rm_score(prompts, completions, prompt_text, **_) -> list[float]:
        # Stripped as the backends strip what they sample, so the RM reads what DPO mode's samples hold.
        responses = [(c[-1]["content"] if isinstance(c, list) else c).strip() for c in completions]
        return score(prompt_text, responses)

    return rm_score


def make_trainer(cfg: Config, policy: Path, rm: Path, prompts: list[str], seed: int, output_dir: Path):
    """trl's trainer for `e_step.mode`, from `policy`, its rollouts sampled by our backend from `seed` on."""
    trainer_cls, config_cls = TRAINERS[cfg.e_step.mode]
    online, s = cfg.e_step.online, cfg.sampling
    tok = load_tokenizer(policy)
    # The sampling's temperature is also the one trl divides the logits by for the loss's log-probs.
    args = trainer_args(
        config_cls,
        online.train,
        cfg,
        output_dir,
        beta=online.kl,
        num_generations=cfg.e_step.num_samples,
        max_completion_length=s.max_new_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
    )
    rows = datasets.Dataset.from_list([{"prompt": trl_prompt(tok, p), "prompt_text": p} for p in prompts])
    trainer = trainer_cls(
        model=str(policy),
        reward_funcs=rm_reward(cfg, rm),
        args=args,
        train_dataset=rows,
        processing_class=tok,
        peft_config=lora_config(online.train, policy, "CAUSAL_LM"),
    )
    trainer.use_engine(cfg, seed)
    return trainer


def train(cfg: Config, policy: Path, rm: Path, prompts: list[str], seed: int, tmp: Path) -> dict:
    """Online training from `policy` on `prompts`; candidates in `tmp/checkpoints` for model selection."""
    trainer = make_trainer(cfg, policy, rm, prompts, seed, tmp / "checkpoints")
    candidates = BackgroundCheckpoints(trainer, tmp / "checkpoints", cfg.e_step.save_steps)
    trainer.train()
    candidates.finish()
    stats = trainer.rollout_stats
    return {
        f"{cfg.e_step.mode}/prompts": len(prompts),
        "rollout/backend": stats["backend"],
        "rollout/seconds": stats["seconds"],
        "rollout/tokens_per_s": stats["tokens"] / stats["seconds"] if stats["seconds"] else 0.0,
        "rollout/top_p_fallback_share": trainer.top_p_fallback_share(),
        "rollout/deferred_steps": stats["deferred_steps"],
        **keep_log(trainer, tmp / "train_log.jsonl", cfg.e_step.mode),
    }
