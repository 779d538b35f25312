"""Instruct task: everyday writing requests with verifiable constraints (see constraints.py).

Gold = weighted share of the prompt's constraints met, read back from the prompt text. Template
responses break a chosen number of constraints (flaws `miss_one`, `miss_two`, `miss_all`).
"""

from __future__ import annotations

import random

from . import constraints
from .task import Task, tokens

MISSES = {"miss_one": 1, "miss_two": 2, "miss_all": 1_000}


class InstructTask(Task):
    flaws = tuple(MISSES)

    def __init__(self, spec: dict):
        super().__init__(spec)
        self.tasks = list(spec["tasks"])
        self.topics = list(spec["topics"])
        self.per_prompt = {int(k): float(v) for k, v in spec["constraints_per_prompt"].items()}
        self.types = spec["constraints"]
        unknown = set(self.types) - set(constraints.CHECKS)
        if unknown:
            raise ValueError(f"unknown constraint types {sorted(unknown)}; known: {sorted(constraints.CHECKS)}")
        self.weights = {kind: float(t["weight"]) for kind, t in self.types.items()}
        self.parsers = [(kind, constraints.phrasing_regex(p)) for kind, t in self.types.items() for p in t["phrasings"]]
        self.group_of = {kind: i for i, group in enumerate(spec.get("groups", [])) for kind in group}
        self.response = spec["response"]

    # --- prompts ----------------------------------------------------------------------------
    def draw_prompt(self, rng: random.Random) -> str:
        return self.compose(rng)[0]

    def compose(self, rng: random.Random) -> tuple[str, list[tuple[str, dict]]]:
        """A prompt and the constraints it carries, in the order they are written."""
        count = rng.choices(list(self.per_prompt), list(self.per_prompt.values()))[0]
        kinds = self.draw_kinds(count, rng)
        chosen = [(kind, constraints.draw_args(kind, self.types[kind], rng)) for kind in kinds]
        clauses = [rng.choice(self.types[kind]["phrasings"]).format(**args) for kind, args in chosen]
        joined = clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]
        topic = rng.choice(self.topics)
        text = f"{rng.choice(self.tasks).format(topic=topic)} {joined[0].upper()}{joined[1:]}."
        return text, chosen

    def draw_kinds(self, count: int, rng: random.Random) -> list[str]:
        # The first constraint is one a near-empty answer cannot meet, so no prompt rewards saying nothing.
        kinds: list[str] = []
        for i in range(count):
            used = {self.group_of.get(k, k) for k in kinds}
            free = [
                k
                for k in self.types
                if self.group_of.get(k, k) not in used and not (i == 0 and k in constraints.TRIVIAL)
            ]
            if not free:
                break
            kinds.append(rng.choices(free, [self.types[k]["frequency"] for k in free])[0])
        return kinds

    def parse(self, prompt: str) -> list[tuple[str, dict]]:
        found = sorted(
            (m.start(), kind, constraints.read_args(m)) for kind, regex in self.parsers for m in regex.finditer(prompt)
        )
        if not found:
            raise ValueError(f"no {self.name} constraint in prompt: {prompt!r}")
        return [(kind, args) for _, kind, args in found]

    def topic_of(self, prompt: str) -> str:
        topics = [t for t in self.topics if t in prompt]
        return max(topics, key=len, default="this")

    # --- gold -------------------------------------------------------------------------------
    def gold(self, prompt: str, response: str) -> float:
        if not response.strip():
            return 0.0
        # A constraint stated twice counts once.
        stated = {(kind, tuple(sorted(args.items()))): (kind, args) for kind, args in self.parse(prompt)}
        total = sum(self.weights[kind] for kind, _ in stated.values())
        return (
            sum(self.weights[kind] * constraints.check(kind, args, response) for kind, args in stated.values()) / total
        )

    # --- template responses -----------------------------------------------------------------
    def respond(self, prompt: str, flaws: frozenset[str], rng: random.Random) -> str:
        wanted = dict(self.parse(prompt))
        misses = max((MISSES[f] for f in flaws), default=0)
        broken = set(rng.sample(sorted(wanted), min(misses, len(wanted))))
        return Writer(self, wanted, broken, self.topic_of(prompt), rng).write()

    def corpus(self) -> list[str]:
        # Words can show up lowercased (lowercase constraint) or capitalised (sentence starts, titles).
        texts = [*self.tasks, *self.topics, *self.response["sentences"], *self.response["extensions"]]
        largest = 0
        for t in self.types.values():
            texts += t["phrasings"] + t.get("words", []) + t.get("phrases", []) + [t.get("sentence", "")]
            largest = max(largest, max(t.get("n", [0])), max(t.get("lo", [0])) + max(t.get("width", [0])))
        texts += [str(i) for i in range(largest + 1)] + ["<<>> - , . ! ?"]
        words = {w for text in texts for w in tokens(text.replace("{", " ").replace("}", " "))}
        return sorted(words | {w.lower() for w in words} | {w.capitalize() for w in words})


class Writer:
    """Builds one template response that meets `wanted` except the constraint types in `broken`."""

    def __init__(self, task: InstructTask, wanted: dict, broken: set, topic: str, rng: random.Random):
        self.wanted, self.broken, self.topic, self.rng = wanted, broken, topic, rng
        self.types, self.cfg = task.types, task.response
        banned = wanted.get("exclude_word", {}).get("word")
        self.sentences = [
            s.format(topic=topic).split()
            for s in self.cfg["sentences"]
            if not banned or not constraints.has_word(s, banned)
        ]
        self.extensions = [e for e in self.cfg["extensions"] if not banned or not constraints.has_word(e, banned)]

    def keeps(self, kind: str) -> bool:
        return kind in self.wanted and kind not in self.broken

    def breaks(self, kind: str) -> bool:
        return kind in self.wanted and kind in self.broken

    def write(self) -> str:
        bullets = "bullets" in self.wanted
        units = self.special_units()
        end = self.end_phrase()
        title = self.title()
        fixed = sum(len(u.split()) for u in [*units, end, title])
        count = self.unit_count()
        if count is None:
            # Free structure: as many filler sentences as the word target needs.
            target = self.word_target(fixed, 1)
            fillers = max(1, round((target - fixed) / self.cfg["unit_words"]))
        else:
            fillers = max(0, count - len(units) - (1 if end and not bullets else 0))
            target = self.word_target(fixed, fillers)
        units += [self.filler(size) for size in self.split_words(target - fixed, fillers)]
        if end and not bullets:
            units.append(end)
        if self.breaks("no_commas") and units:
            units[0] = units[0].replace(" ", ", ", 1)
        lines = [f"<<{title}>>", ""] if title else []
        if bullets:
            lines += [f"- {cap(u)}" for u in units] + ([f"{cap(end)}."] if end else [])
        else:
            lines.append(" ".join(f"{cap(u)}." for u in units))
        text = "\n".join(lines)
        return text.lower() if self.keeps("lowercase") else text

    def special_units(self) -> list[str]:
        units = []
        if self.keeps("include_word"):
            units.append(self.types["include_word"]["sentence"].format(**self.wanted["include_word"]))
        if self.breaks("exclude_word"):
            units.append(self.types["exclude_word"]["sentence"].format(**self.wanted["exclude_word"]))
        return units

    def end_phrase(self) -> str:
        if self.keeps("ends_with"):
            return self.wanted["ends_with"]["phrase"]
        if self.breaks("ends_with"):
            others = [p for p in self.types["ends_with"]["phrases"] if p != self.wanted["ends_with"]["phrase"]]
            return self.rng.choice(others) if others and self.rng.random() < 0.5 else ""
        return ""

    def title(self) -> str:
        return self.topic.title() if self.keeps("title") else ""

    def unit_count(self) -> int | None:
        for kind in ("bullets", "sentences"):
            if kind in self.wanted:
                n = self.wanted[kind]["n"]
                if self.keeps(kind):
                    return n
                return n + 1 if n == 1 else n + self.rng.choice([-1, 1])
        return None

    def word_target(self, fixed: int, fillers: int) -> int:
        low = fixed + fillers * self.cfg["min_unit_words"]
        randint, keeps = self.rng.randint, self.keeps
        if "words_at_most" in self.wanted:
            n = self.wanted["words_at_most"]["n"]
            return randint(min(n, max(low, n // 2)), n) if keeps("words_at_most") else randint(n + 1, n + 20)
        if "words_at_least" in self.wanted:
            n = self.wanted["words_at_least"]["n"]
            return randint(n, n + 30) if keeps("words_at_least") else randint(max(1, n // 2), n - 1)
        if "words_between" in self.wanted:
            lo, hi = self.wanted["words_between"]["lo"], self.wanted["words_between"]["hi"]
            if keeps("words_between"):
                return randint(lo, hi)
            return randint(max(1, lo // 2), lo - 1) if self.rng.random() < 0.5 else randint(hi + 1, hi + 20)
        return randint(*self.cfg["words"])

    def split_words(self, total: int, parts: int) -> list[int]:
        if parts == 0:
            return []
        sizes = [self.cfg["min_unit_words"]] * parts
        for _ in range(max(0, total - sum(sizes))):
            sizes[self.rng.randrange(parts)] += 1
        return sizes

    def filler(self, size: int) -> str:
        """A sentence of exactly `size` words: template sentences joined by "and", topped up with
        short extensions."""
        words: list[str] = []
        while len(words) < size:
            room = size - len(words)
            pieces = [["and", *lower_first(p)] for p in self.sentences] if words else self.sentences
            fits = [p for p in pieces if len(p) <= room]
            if not fits and words:
                fits = [e.split() for e in self.extensions if len(e.split()) <= room]
            words += self.rng.choice(fits or pieces)
        return " ".join(words[:size])


def lower_first(words: list[str]) -> list[str]:
    return words if words[0] == "I" else [words[0].lower(), *words[1:]]


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


TASK = InstructTask
