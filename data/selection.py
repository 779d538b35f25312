"""Which prompts an iteration works on: its share of a split, mixed with hard past prompts. Shared by
the E-step, the M-step and the revise step, which must answer the same batches."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import datasets

from .sampling import sample_prompts
from .store import Store

if TYPE_CHECKING:
    from coevolve.core.config import Config


def iteration_prompts(prompts: datasets.Dataset, split: str, per_iteration: int | None, k: int) -> datasets.Dataset:
    """This iteration's share of a split: all of it, or the (k-1)-th chunk of `per_iteration` (cycling)."""
    rows = prompts.filter(lambda r: r["split"] == split)
    if per_iteration is None or per_iteration >= len(rows):
        return rows
    start = ((k - 1) * per_iteration) % len(rows)
    return rows.select([(start + i) % len(rows) for i in range(per_iteration)])


def policy_batch(cfg: Config, run: Path, prompts: datasets.Dataset, k: int) -> datasets.Dataset:
    """Iteration k's policy-update prompts: its share of the split, mixed with hard past prompts when
    `stores.hard_fraction` is set. The revise step answers the same batch."""
    batch = iteration_prompts(prompts, "policy", cfg.e_step.prompts_per_iteration, k)
    if cfg.stores.hard_fraction > 0:
        mixed = sample_prompts(
            batch.to_list(),
            Store(run, cfg.stores.max_rows),
            k,
            len(batch),
            cfg.stores.hard_fraction,
            cfg.seed + k,
            cfg.stores.easy_threshold,
        )
        batch = datasets.Dataset.from_list(mixed)
    return batch
