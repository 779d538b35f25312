"""A sandbox task: prompts with a programmatic gold reward r*(prompt, response) in [0, 1].

A task is a spec file (YAML) whose `kind` names the module holding its code (`toy.py`, `instruct.py`).
What every kind shares lives here: the prompt stream, mixed-quality demonstrations, and
Bradley-Terry "human" labels drawn from r*. A kind supplies `draw_prompt`, `respond`, `gold`, `corpus`.
"""

from __future__ import annotations

import importlib
import math
import random
import re
from abc import ABC, abstractmethod
from pathlib import Path

import yaml

from coevolve.core.config import ConfigError

BUILTIN_DIR = Path(__file__).parent

# Rejecting a duplicate prompt this many times in a row means the prompt space is (nearly) used up.
MAX_DUPLICATE_DRAWS = 100


class Task(ABC):
    """Base class of every task kind; built from a spec dict by `load_task`."""

    #: flaw names a kind's `respond` understands; demonstration mixes are checked against them.
    flaws: tuple[str, ...] = ()

    def __init__(self, spec: dict):
        self.spec = spec
        self.name = spec["name"]
        self.temperature = float(spec.get("noise", {}).get("temperature", 0.0))
        self.mix = _parse_mix(spec["demonstrations"]["mix"], self.flaws)

    # --- what a kind implements -------------------------------------------------------------
    @abstractmethod
    def draw_prompt(self, rng: random.Random) -> str: ...

    @abstractmethod
    def respond(self, prompt: str, flaws: frozenset[str], rng: random.Random) -> str:
        """A template response to `prompt`, perfect except for the named flaws."""
        ...

    @abstractmethod
    def gold(self, prompt: str, response: str) -> float:
        """r* in [0, 1], from the prompt text alone; ValueError for a prompt of another task."""
        ...

    @abstractmethod
    def corpus(self) -> list[str]:
        """Every token (see `tokens`) that prompts and template responses can hold, sorted."""
        ...

    # --- shared -----------------------------------------------------------------------------
    def prompts(self, n: int, seed: int) -> list[str]:
        """`n` prompts, distinct while the prompt space allows; a prefix of `prompts(m, seed)`, m > n."""
        return self._prompts(n, random.Random(f"prompts-{seed}"))

    def demonstrations(self, n: int, seed: int) -> list[dict]:
        rng = random.Random(f"demos-{seed}")
        demos = []
        for prompt in self._prompts(n, rng):
            completion = self.respond(prompt, self._draw_flaws(rng), rng)
            demos.append({"prompt": prompt, "completion": completion, "gold": self.gold(prompt, completion)})
        return demos

    def label_pairs(
        self, prompts: list[str], responses: list[list[str]], temperature: float | None = None, seed: int = 0
    ) -> list[dict]:
        """One Bradley-Terry labelled pair per prompt: P(a preferred) = sigmoid((r*(a) - r*(b)) / T).

        `temperature=None` takes the spec's `noise.temperature`. At T = 0 the gold-better response is
        always chosen and exact gold ties are skipped; prompts with fewer than two distinct responses
        are skipped too.
        """
        temperature = self.temperature if temperature is None else float(temperature)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        rng = random.Random(f"labels-{seed}")
        pairs = []
        for prompt, candidates in zip(prompts, responses, strict=True):
            distinct = list(dict.fromkeys(candidates))
            if len(distinct) < 2:
                continue
            a, b = rng.sample(distinct, 2)
            gold_a, gold_b = self.gold(prompt, a), self.gold(prompt, b)
            if temperature == 0:
                if gold_a == gold_b:
                    continue
                a_wins = gold_a > gold_b
            else:
                a_wins = rng.random() < sigmoid((gold_a - gold_b) / temperature)
            if not a_wins:
                a, b, gold_a, gold_b = b, a, gold_b, gold_a
            pairs.append({"prompt": prompt, "chosen": a, "rejected": b, "chosen_gold": gold_a, "rejected_gold": gold_b})
        return pairs

    def pair_prompts(self, n: int, seed: int) -> list[str]:
        """The prompts of the "human" pairs sampled from a policy (a stream apart from `prompts`)."""
        return self._prompts(n, random.Random(f"pair-prompts-{seed}"))

    def synthetic_pairs(self, n: int, seed: int, temperature: float | None = None) -> list[dict]:
        """Labelled pairs on `n` prompts from the demonstration generator, before any policy exists."""
        rng = random.Random(f"synthetic-{seed}")
        prompts = self._prompts(n, rng)
        responses = [self._two_responses(prompt, rng) for prompt in prompts]
        return self.label_pairs(prompts, responses, temperature, seed)

    def _two_responses(self, prompt: str, rng: random.Random) -> list[str]:
        # A pair of equal gold teaches the RM nothing (and is dropped at T = 0), so redraw a few times.
        first = self.respond(prompt, self._draw_flaws(rng), rng)
        gold_first = self.gold(prompt, first)
        for _ in range(20):
            second = self.respond(prompt, self._draw_flaws(rng), rng)
            if second != first and self.gold(prompt, second) != gold_first:
                break
        return [first, second]

    def _prompts(self, n: int, rng: random.Random) -> list[str]:
        seen: set[str] = set()
        out: list[str] = []
        repeats = 0
        while len(out) < n:
            prompt = self.draw_prompt(rng)
            if prompt in seen and repeats < MAX_DUPLICATE_DRAWS:
                repeats += 1
                continue
            seen.add(prompt)
            out.append(prompt)
            repeats = 0
        return out

    def _draw_flaws(self, rng: random.Random) -> frozenset[str]:
        flaw_sets, weights = zip(*self.mix)
        return rng.choices(flaw_sets, weights)[0]


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def tokens(text: str) -> list[str]:
    """The units `corpus()` lists: runs of word characters and single punctuation marks."""
    return re.findall(r"\w+|[^\w\s]", text)


def _parse_mix(mix: dict[str, float], known: tuple[str, ...]) -> list[tuple[frozenset[str], float]]:
    """Spec mix keys are `perfect` or flaw names joined by `+` (e.g. `wrong_count+repeat`)."""
    parsed = []
    for key, weight in mix.items():
        flaws = frozenset() if key == "perfect" else frozenset(key.split("+"))
        unknown = flaws - set(known)
        if unknown:
            raise ValueError(f"unknown flaw(s) {sorted(unknown)} in demonstrations.mix; known: {known}")
        parsed.append((flaws, float(weight)))
    if not parsed or sum(w for _, w in parsed) <= 0:
        raise ValueError("demonstrations.mix needs at least one positive weight")
    return parsed


def load_task(name_or_path: str | Path) -> Task:
    """A builtin task by name ("toy", "instruct") or any spec YAML by path."""
    path = Path(name_or_path)
    builtin = BUILTIN_DIR / f"{name_or_path}.yaml"
    if path.suffix not in (".yaml", ".yml") and builtin.is_file():
        path = builtin
    if not path.is_file():
        raise ConfigError(f"data.task: no task spec {str(name_or_path)!r} (builtins: {builtin_names()})")
    spec = yaml.safe_load(path.read_text())
    spec.setdefault("name", path.stem)
    kind = spec.get("kind", "")
    if not re.fullmatch(r"[a-z_]+", kind) or not (BUILTIN_DIR / f"{kind}.py").is_file():
        raise ConfigError(f"data.task: {path}: unknown task kind {kind!r}")
    module = importlib.import_module(f"{__package__}.{kind}")
    if not hasattr(module, "TASK"):
        raise ConfigError(f"data.task: {path}: module {kind!r} defines no task kind")
    try:
        return module.TASK(spec)
    except ValueError as err:  # the spec's own checks (_parse_mix, ...), which do not know its file
        raise ConfigError(f"data.task: {path}: {err}") from None


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))
