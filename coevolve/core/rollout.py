"""Sampling from saved policies and scoring with a saved RM: the two GPU workloads every step shares.
Each takes its model from the step's models (core/loaded.py), read once per step; outside a step it
loads it, does its batched passes, and frees the memory before the next model loads."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from coevolve.core import distributed, loaded
from coevolve.core.chat import policy_prompt_text
from coevolve.core.config import Config
from coevolve.core.generation import Generations, SamplingParams, backend_for
from coevolve.core.gold import gold_task
from coevolve.core.scoring import RewardScorer
from coevolve.core.step import Progress

log = logging.getLogger("coevolve")


def sampling_params(cfg: Config, n: int, seed: int, logprobs: bool = False) -> SamplingParams:
    s = cfg.sampling
    return SamplingParams(
        n=n,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        max_new_tokens=s.max_new_tokens,
        seed=seed,
        logprobs=logprobs,
    )


def sample(
    cfg: Config, policy: Path, prompts: list[str], n: int, seed: int, label: str = "generate", logprobs: bool = False
) -> Generations:
    return sample_each(cfg, [(policy, seed, label)], prompts, n, logprobs)[0]


def sample_each(
    cfg: Config, policies: list[tuple[Path, int, str]], prompts: list[str], n: int, logprobs: bool = False
) -> list[Generations]:
    """`n` samples per prompt from each (policy, seed, progress label). The policies must share one
    architecture (checkpoints of one model): the first is loaded, and each next one's weights are
    copied into it in place, so one backend, with its captured CUDA graphs, serves them all (the
    step keeps that model no longer). Under several processes each samples its share of the prompts,
    and each gets back all the samples. `logprobs`: also the sampled token ids and their log-probs,
    where the backend gives them."""
    with loaded.current(cfg) as models:
        first = policies[0][0]
        model, tok = models.policy(first) if len(policies) == 1 else models.take_policy(first)
        backend, which = backend_for(cfg.generation, model, tok)
        log.info(f"generation backend: {which}")
        mine = distributed.share(len(prompts))
        texts = [policy_prompt_text(tok, prompts[i]) for i in mine]
        out = []
        for i, (policy, seed, label) in enumerate(policies):
            if i > 0:
                backend.update_weights(models.weights(policy, model.dtype))
            backend.progress = Progress(label, len(texts))
            # A process whose share is empty (fewer prompts than processes) still joins the gather.
            params = replace(sampling_params(cfg, n, seed, logprobs), first_prompt=mine.start)
            gens = backend.generate(texts, params) if texts else Generations([], [], 0.0, {})
            gens.stats["backend"] = which
            out.append(_gathered(gens))
        del model, backend
    return out


def _gathered(gens: Generations) -> Generations:
    """Every process's share of `gens`, whole, on each; the optional lists where the backend gave them."""
    # A process with an empty share has no way to know whether the others' backend gave them.
    given = distributed.from_main(gens.logprobs is not None)
    optional = (
        {name: distributed.gather(getattr(gens, name) or []) for name in ("prompt_ids", "token_ids", "logprobs")}
        if given
        else {}
    )
    # Throughput over the slowest process's time: the processes sample side by side.
    return Generations(
        distributed.gather(gens.texts),
        distributed.gather(gens.num_tokens),
        max(distributed.gather([gens.seconds])),
        gens.stats,
        **optional,
    )


def score(cfg: Config, rm: Path, prompts: list[str], responses: list[str], label: str = "score") -> list[float]:
    return score_each(cfg, rm, prompts, [responses], label)[0]


def score_each(
    cfg: Config, rm: Path, prompts: list[str], answers: list[list[str]], label: str = "score"
) -> list[list[float]]:
    """The RM's scores of each list of responses to `prompts` (e.g. several models' answers), from the
    step's RM and one length-sorted pass over them all (under several processes, each scores its share)."""
    n = len(prompts)
    if any(len(responses) != n for responses in answers):
        raise ValueError(f"score: {[len(r) for r in answers]} responses for {n} prompts")
    flat_prompts, flat = list(prompts) * len(answers), [r for responses in answers for r in responses]
    task = gold_task(rm)
    if task is not None:
        scores = [task.gold(p, r) for p, r in zip(flat_prompts, flat)]
    else:
        with loaded.current(cfg) as models:
            model, tok = models.rm(rm)
            mine = distributed.share(len(flat))
            scorer = RewardScorer(model, tok, cfg.generation.batch_size, progress=Progress(label, len(mine)))
            scores = distributed.gather(
                scorer.score(flat_prompts[mine.start : mine.stop], flat[mine.start : mine.stop])
            )
            del model, scorer
    return [scores[i * n : (i + 1) * n] for i in range(len(answers))]
