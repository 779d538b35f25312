"""Turning one prompt's scored samples into a (chosen, rejected) pair, or a reason why not."""

from __future__ import annotations

from statistics import mean


def length_controlled(texts: list[str], scores: list[float], lengths: list[int]) -> tuple[int, int] | str:
    """Mutual-Taught's rule: chosen = the shortest response scoring above the prompt's mean score
    (ties: higher score, then first); rejected = the lowest-scoring response (ties: first)."""
    avg = mean(scores)
    above = [i for i, s in enumerate(scores) if s > avg]
    if not above:
        return "all scores equal"
    chosen = min(above, key=lambda i: (lengths[i], -scores[i], i))
    rejected = min(range(len(scores)), key=lambda i: (scores[i], i))
    return _checked(texts, chosen, rejected)


def best_vs_worst(texts: list[str], scores: list[float], lengths: list[int]) -> tuple[int, int] | str:
    """Plain rule: chosen = the highest score (ties: shorter, then first), rejected = the lowest."""
    if max(scores) == min(scores):
        return "all scores equal"
    chosen = min(range(len(scores)), key=lambda i: (-scores[i], lengths[i], i))
    rejected = min(range(len(scores)), key=lambda i: (scores[i], i))
    return _checked(texts, chosen, rejected)


def _checked(texts: list[str], chosen: int, rejected: int) -> tuple[int, int] | str:
    if texts[chosen] == texts[rejected]:
        return "chosen and rejected texts are identical"
    return chosen, rejected


RULES = {"length_controlled": length_controlled, "best_vs_worst": best_vs_worst}
