"""Difficulty-aware retrospective sampling (after QwenLong-L1) and the replay mix for the RM.

Difficulty of a prompt, in [0, 1], 1 = hardest. A prompt is compared with the other prompts scored
in the same round, a round being (iteration, step, rm): RM scores of different RMs, or of 5 samples
against 2, are not comparable; ranks within a round are. Only the rounds of the prompt's latest
iteration with scored responses count, so a prompt that got easy drops out. With q_mean the percentile
of the prompt's mean score in its round and q_margin that of its best-minus-worst score,

    difficulty = 1 - (3 * q_mean + q_margin) / 4

so a low mean reward weighs most (as in QwenLong-L1), and a small margin (responses the RM cannot tell
apart) adds to it. A prompt in several rounds of its latest iteration averages them; one alone in its
round gets percentiles of 0.5. Percentiles average over ties.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np
from datasets import Dataset, concatenate_datasets

from .schema import FEATURES, empty

if TYPE_CHECKING:
    from .store import Store


def difficulty(responses: Dataset) -> dict[str, float]:
    """prompt_id -> difficulty in [0, 1] (formula in the module docstring); prompts without a scored
    response are left out."""
    cols = responses.select_columns(["prompt_id", "iteration", "step", "rm", "score"]).to_dict()
    latest: dict[str, int] = {}
    for pid, it, score in zip(cols["prompt_id"], cols["iteration"], cols["score"]):
        if not math.isnan(score):
            latest[pid] = max(latest.get(pid, it), it)

    rounds: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for pid, it, step, rm, score in zip(*cols.values()):
        if not math.isnan(score):
            rounds[(it, step, rm)][pid].append(score)

    per_prompt: dict[str, list[float]] = defaultdict(list)
    for (it, _, _), scores in rounds.items():
        pids = list(scores)
        q_mean = _percentiles([float(np.mean(scores[p])) for p in pids])
        q_margin = _percentiles([max(scores[p]) - min(scores[p]) for p in pids])
        for p, qm, qg in zip(pids, q_mean, q_margin):
            if it == latest[p]:
                per_prompt[p].append(1 - (3 * qm + qg) / 4)
    return {p: float(np.mean(d)) for p, d in per_prompt.items()}


def _percentiles(values: list[float]) -> np.ndarray:
    """Rank of each value scaled to [0, 1], ties sharing their average rank."""
    v = np.asarray(values, dtype=float)
    if len(v) == 1:
        return np.array([0.5])
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v))
    for value in np.unique(v):
        tied = v == value
        ranks[tied] = ranks[tied].mean()
    return ranks / (len(v) - 1)


def sample_prompts(
    fresh: list[dict],
    store: Store,
    iteration: int,
    n: int,
    hard_fraction: float,
    seed: int,
    easy_threshold: float,
    split: str = "policy",
) -> list[dict]:
    """The prompt batch of `iteration`: fresh prompts mixed with hard past ones, shuffled.

    Past candidates are the store's prompts of `split` first seen before `iteration`, not among
    `fresh`, whose difficulty (from responses before `iteration`) is above `easy_threshold`; prompts
    never scored are not candidates. round(n * hard_fraction) of them are drawn with probability
    proportional to difficulty; fresh prompts, taken in the order given, fill the rest. When there
    are too few candidates, fresh prompts fill their places, and the other way round; the batch is
    shorter than n only when both run out. Deterministic for a seed.
    """
    if not 0 <= hard_fraction <= 1 or not 0 <= easy_threshold < 1:
        raise ValueError("need 0 <= hard_fraction <= 1 and 0 <= easy_threshold < 1")
    hardness = difficulty(_load_before(store, "responses", iteration))
    fresh_ids = {r["prompt_id"] for r in fresh}
    candidates = [
        r
        for r in _load_before(store, "prompts", iteration).to_list()
        if r["split"] == split
        and r["prompt_id"] not in fresh_ids
        and hardness.get(r["prompt_id"], 0.0) > easy_threshold
    ]

    n_hard = min(round(n * hard_fraction), len(candidates))
    n_fresh = min(n - n_hard, len(fresh))
    n_hard = min(n - n_fresh, len(candidates))
    rng = np.random.default_rng(seed)
    weights = [hardness[r["prompt_id"]] for r in candidates]
    hard = [candidates[i] for i in _proportional_sample(weights, n_hard, rng)]
    batch = list(fresh[:n_fresh]) + hard
    return [batch[i] for i in rng.permutation(len(batch))]


def _proportional_sample(weights: list[float], k: int, rng: np.random.Generator) -> list[int]:
    """k distinct indices, index i included with probability k * w_i / sum(w) exactly (systematic
    PPS sampling); items whose share would exceed 1 are taken for sure, the rest share what is left.
    Plain weighted draws without replacement would under-pick the heaviest items."""
    w = np.asarray(weights, dtype=float)
    sure: np.ndarray = np.zeros(len(w), dtype=bool)
    while True:
        rest = np.flatnonzero(~sure)
        k_rest = k - int(sure.sum())
        if k_rest == 0:
            return list(np.flatnonzero(sure))
        share = k_rest * w[rest] / w[rest].sum()
        if (share <= 1).all():
            break
        sure[rest[share > 1]] = True
    order = rng.permutation(len(rest))
    edges = np.cumsum(share[order])
    points = rng.uniform() + np.arange(k_rest)
    hit = np.minimum(np.searchsorted(edges, points, side="right"), len(rest) - 1)
    return list(np.flatnonzero(sure)) + list(rest[order[hit]])


def replay_mix(
    current: Dataset,
    store: Store,
    iteration: int,
    proportions: dict[str, float],
    seed: int,
    size: int | None = None,
) -> Dataset:
    """The RM's training mix: `current` pairs plus pairs replayed from iterations before `iteration`.

    Sources: "current" is `current`; "pseudo_pairs" the kept pseudo pairs of earlier iterations; any
    other name the stored pairs of earlier iterations whose `source` is that name (e.g. "original",
    "e-step"). Each source gets round(size * share) rows (largest remainders make them add up), drawn
    without repeats. A source with fewer rows gives all it has and its shortfall goes to the others in
    proportion to their shares, so at the first iteration the mix is just `current`. size None means
    all of `current` once: len(current) / proportions["current"]. Columns are those of pairs; the
    rows are shuffled.
    """
    if any(p < 0 for p in proportions.values()) or sum(proportions.values()) <= 0:
        raise ValueError(f"proportions must be >= 0 and not all 0, got {proportions}")
    if size is None:
        if proportions.get("current", 0) <= 0:
            raise ValueError("size=None needs a positive share for 'current'")
        size = round(len(current) / (proportions["current"] / sum(proportions.values())))

    pair_columns = list(FEATURES["pairs"])
    pools = {
        name: _pool(name, current, store, iteration).select_columns(pair_columns)
        for name, share in proportions.items()
        if share > 0
    }
    counts = _allocate(
        size, {name: proportions[name] for name in pools}, {name: len(pool) for name, pool in pools.items()}
    )

    rng = np.random.default_rng(seed)
    parts = [
        pools[name].select(rng.choice(len(pools[name]), counts[name], replace=False)) for name in pools if counts[name]
    ]
    if not parts:
        return empty("pairs")
    mix = concatenate_datasets([p.cast(FEATURES["pairs"]) for p in parts])
    return mix.select(rng.permutation(len(mix)))


def _pool(name: str, current: Dataset, store: Store, iteration: int) -> Dataset:
    if name == "current":
        return current
    kind = "pseudo_pairs" if name == "pseudo_pairs" else "pairs"
    rows = _load_before(store, kind, iteration)
    keep = rows["kept"] if kind == "pseudo_pairs" else [s == name for s in rows["source"]]
    return rows.select(np.flatnonzero(keep))


def _load_before(store: Store, kind: str, iteration: int) -> Dataset:
    return store.load(kind, [k for k in store.iterations(kind) if k < iteration])


def _allocate(size: int, shares: dict[str, float], available: dict[str, int]) -> dict[str, int]:
    """Rows per source: shares of `size` by largest remainder, a short source's shortfall handed on."""
    counts = dict.fromkeys(shares, 0)
    unfilled = set(shares)
    left = size
    while left > 0 and unfilled:
        total = sum(shares[s] for s in unfilled)
        exact = {s: left * shares[s] / total for s in unfilled}
        give = {s: math.floor(x) for s, x in exact.items()}
        by_remainder = sorted(unfilled, key=lambda s: (give[s] - exact[s], s))
        for s in by_remainder[: left - sum(give.values())]:
            give[s] += 1
        for s in list(unfilled):
            take = min(give[s], available[s] - counts[s])
            counts[s] += take
            left -= take
            if counts[s] == available[s]:
                unfilled.discard(s)
    return counts
