"""Scoring (prompt, response) pairs with a sequence-classification RM, batched by length; and the one
way scores are compared pairwise (win rates, pair accuracies)."""

from __future__ import annotations

import torch

from coevolve.core.chat import rm_input_ids


class RewardScorer:
    def __init__(self, model, tokenizer, batch_size: int = 64, max_length: int = 2048, progress=None):
        self.model, self.tok = model, tokenizer
        self.batch_size, self.max_length, self.progress = batch_size, max_length, progress

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        ids = [rm_input_ids(self.tok, p, r)[-self.max_length :] for p, r in zip(prompts, responses)]
        # Length-sorted batches: a batch pads only to its own longest row.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        scores = [0.0] * len(ids)
        device = next(self.model.parameters()).device
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            batch = self.tok.pad({"input_ids": [ids[i] for i in idx]}, padding_side="right", return_tensors="pt").to(
                device
            )
            logits = self.model(**batch).logits[:, 0].float().cpu().tolist()
            for i, s in zip(idx, logits):
                scores[i] = s
            if self.progress:
                self.progress(min(b + self.batch_size, len(order)), len(order))
        return scores


def win_rate(first: list[float], second: list[float]) -> float:
    """Share of positions where `first` scores higher than `second`; a tie counts half. With the
    preferred side first, this is a pairwise accuracy."""
    if not first:
        return float("nan")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(first, second, strict=True)) / len(first)


def pairwise_accuracy(
    rm_a: list[float], rm_b: list[float], ref_a: list[float], ref_b: list[float]
) -> tuple[float, int]:
    """Share of pairs the RM orders as the referee does, over the pairs the referee does not tie; an
    RM tie counts half. Also returns how many pairs counted."""
    preferred, other = [], []
    for ra, rb, ga, gb in zip(rm_a, rm_b, ref_a, ref_b, strict=True):
        if ga != gb:
            preferred.append(ra if ga > gb else rb)
            other.append(rb if ga > gb else ra)
    return win_rate(preferred, other), len(preferred)
