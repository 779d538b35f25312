"""Toy task: name k words of a category, maybe in (reverse) alphabetical order.

Prompt: "list three animals in alphabetical order". Response: space-separated words, "cat dog fox".
Gold = weighted partial credit for count, category, order, no repeats and a clean stop (no junk words);
each violation of a constraint multiplies its credit by `violation_decay`.

A spec may give the response generator a `style`: an opener word (e.g. "sure") put before the list
with a probability that falls with the number of flaws. The gold counts it as junk, but in the
generator's responses, and so in the "human" pairs labelled from them, it marks the better answer: the
kind of spurious feature a proxy RM learns and a policy optimised against that RM exploits.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .task import Task

ORDERS = ("alphabetical", "reverse", "none")


@dataclass(frozen=True)
class Request:
    count: int
    category: str
    order: str


class ToyTask(Task):
    flaws = ("wrong_count", "too_few", "wrong_category", "repeat", "wrong_order", "junk")

    def __init__(self, spec: dict):
        super().__init__(spec)
        self.categories = {name: list(words) for name, words in spec["categories"].items()}
        self.category_of: dict[str, str] = {}
        for name, words in self.categories.items():
            for word in words:
                if word in self.category_of:
                    raise ValueError(f"{word!r} is in both {self.category_of[word]} and {name}")
                self.category_of[word] = name
        self.verbs = list(spec["verbs"])
        self.count_words = {int(k): v for k, v in spec["counts"].items()}
        self.count_of = {v: k for k, v in self.count_words.items()}
        unknown = set(spec["orders"]) - set(ORDERS)
        if unknown:
            raise ValueError(f"unknown order kinds {sorted(unknown)}; known: {ORDERS}")
        self.order_phrases = {kind: o["phrase"] for kind, o in spec["orders"].items()}
        self.order_weights = {kind: float(o["weight"]) for kind, o in spec["orders"].items()}
        self.extras = list(spec["extras"])
        self.junk = list(spec["junk"])
        self.weights = {key: float(w) for key, w in spec["weights"].items()}
        self.decay = float(spec["violation_decay"])
        # "mean": a weighted mean of the constraints' credits; "product": their weighted geometric mean,
        # so that one badly broken constraint costs most of the reward.
        self.aggregate = spec.get("aggregate", "mean")
        if self.aggregate not in ("mean", "product"):
            raise ValueError(f"aggregate: 'mean' or 'product', got {self.aggregate!r}")
        style = spec.get("style", {})
        self.openers = list(style.get("openers", []))
        # Index = number of flaws, the last share standing for any more.
        self.opener_share = [float(p) for p in style.get("opener_share", [0.0])]

    def draw_prompt(self, rng: random.Random) -> str:
        count = rng.choice(sorted(self.count_words))
        order = rng.choices(list(self.order_weights), list(self.order_weights.values()))[0]
        parts = [
            rng.choice(self.verbs),
            self.count_words[count],
            rng.choice(list(self.categories)),
            self.order_phrases[order],
            rng.choice(self.extras),
        ]
        return " ".join(part for part in parts if part)

    def parse(self, prompt: str) -> Request:
        words = prompt.split()
        counts = [self.count_of[w] for w in words if w in self.count_of]
        categories = [w for w in words if w in self.categories]
        if not counts or not categories:
            raise ValueError(f"not a {self.name} prompt: {prompt!r}")
        # The longest matching phrase wins: "in alphabetical order" is inside the reverse phrase.
        padded = f" {' '.join(words)} "
        matches = [kind for kind, phrase in self.order_phrases.items() if phrase and f" {phrase} " in padded]
        order = max(matches, key=lambda kind: len(self.order_phrases[kind]), default="none")
        return Request(counts[0], categories[0], order)

    def gold(self, prompt: str, response: str) -> float:
        request = self.parse(prompt)
        words = response.split()
        items = [w for w in words if w in self.category_of]
        if not items:
            return 0.0
        on_topic = sum(self.category_of[w] == request.category for w in items)
        violations = {
            "count": abs(on_topic - request.count),
            "category": len(items) - on_topic,
            "repeats": len(items) - len(set(items)),
            "stop": len(words) - len(items),
        }
        if request.order != "none":
            violations["order"] = out_of_order(items, reverse=request.order == "reverse")
        total = sum(self.weights[key] for key in violations)
        if self.aggregate == "product":
            return math.prod(self.decay ** (n * self.weights[key] / total) for key, n in violations.items())
        return sum(self.weights[key] * self.decay**n for key, n in violations.items()) / total

    def respond(self, prompt: str, flaws: frozenset[str], rng: random.Random) -> str:
        request = self.parse(prompt)
        pool = self.categories[request.category]
        count = request.count
        if "wrong_count" in flaws:
            count = max(1, count + rng.choice([-2, -1, 1, 2]))
        if "too_few" in flaws:
            count = max(1, count - rng.randint(1, 3))
        items = rng.sample(pool, min(count, len(pool)))
        if "wrong_category" in flaws:
            others = [w for w in self.category_of if self.category_of[w] != request.category]
            for i in rng.sample(range(len(items)), rng.randint(1, max(1, len(items) // 2))):
                items[i] = rng.choice(others)
        if "repeat" in flaws and len(items) > 1:
            i, j = rng.sample(range(len(items)), 2)
            items[i] = items[j]
        if request.order != "none":
            items.sort(reverse=request.order == "reverse")
            if "wrong_order" in flaws:
                items = break_order(items, request.order == "reverse", rng)
        if "junk" in flaws:
            items += rng.choices(self.junk, k=rng.randint(1, 3))
        if self.openers and rng.random() < self.opener_share[min(len(flaws), len(self.opener_share) - 1)]:
            items.insert(0, rng.choice(self.openers))
        return " ".join(items)

    def corpus(self) -> list[str]:
        words = set(self.category_of) | set(self.categories) | set(self.verbs) | set(self.junk) | set(self.openers)
        words |= set(self.count_words.values())
        for phrase in [*self.order_phrases.values(), *self.extras]:
            words |= set(phrase.split())
        return sorted(words)


def out_of_order(items: list[str], reverse: bool) -> int:
    """Adjacent pairs out of the requested order (equal neighbours are in order)."""
    return sum((a < b) if reverse else (a > b) for a, b in zip(items, items[1:]))


def break_order(items: list[str], reverse: bool, rng: random.Random) -> list[str]:
    if len(set(items)) < 2:
        return items
    shuffled = items[:]
    while not out_of_order(shuffled, reverse):
        rng.shuffle(shuffled)
    return shuffled


TASK = ToyTask
