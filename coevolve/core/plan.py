"""Which steps a run is made of, in order: one list that `coevolve run` and the Prefect flow share."""
from __future__ import annotations

from coevolve.core.config import Config

# Steps that sample from a model (retried by default) vs steps that train.
GENERATION_STEPS = {"revise", "evaluate"}


def iteration_steps(cfg: Config, k: int) -> list[str]:
    if k == 0:
        return ["init"] + ["sft-warmup"] * cfg.steps.sft_warmup + ["rm-init"] * cfg.steps.rm_init + ["evaluate"] * cfg.steps.evaluate
    steps = ["reviser-train", "revise"] if cfg.steps.reviser else []
    steps.append("e-step")
    steps += ["m-step"] * cfg.steps.m_step + ["evaluate"] * cfg.steps.evaluate
    return steps


def step_plan(cfg: Config) -> list[tuple[int, str]]:
    return [(k, s) for k in range(cfg.iterations + 1) for s in iteration_steps(cfg, k)]
