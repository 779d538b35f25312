"""Sampling from a saved policy and scoring with a saved RM: the two GPU workloads every step shares.
Each loads its model, does one batched pass, and frees the memory before the next model loads."""
from __future__ import annotations

import gc
from pathlib import Path

import torch

from coevolve.core.chat import policy_prompt_text
from coevolve.core.config import Config
from coevolve.core.generation import Generations, SamplingParams, make_backend
from coevolve.core.gold import gold_task
from coevolve.core.models import load_policy, load_rm
from coevolve.core.scoring import RewardScorer
from coevolve.core.step import Progress


def sampling_params(cfg: Config, n: int, seed: int) -> SamplingParams:
    s = cfg.sampling
    return SamplingParams(n=n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens, seed=seed)


def sample(cfg: Config, policy: Path, prompts: list[str], n: int, seed: int, label: str = "generate") -> Generations:
    model, tok = load_policy(policy, cfg)
    backend = make_backend(cfg.generation.backend, model, tok, batch_size=cfg.generation.batch_size, progress=Progress(label, len(prompts)))
    out = backend.generate([policy_prompt_text(tok, p) for p in prompts], sampling_params(cfg, n, seed))
    _free(model, backend)
    return out


def score(cfg: Config, rm: Path, prompts: list[str], responses: list[str], label: str = "score") -> list[float]:
    task = gold_task(rm)
    if task is not None:
        return [task.gold(p, r) for p, r in zip(prompts, responses, strict=True)]
    model, tok = load_rm(rm, cfg)
    scores = RewardScorer(model, tok, cfg.generation.batch_size, progress=Progress(label, len(prompts))).score(prompts, responses)
    _free(model)
    return scores


def _free(*objects) -> None:
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
