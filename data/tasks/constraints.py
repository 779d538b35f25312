"""Verifiable instruction constraints in the style of IFEval.

A constraint is `(type, args)`, e.g. `("bullets", {"n": 3})`. The spec gives each type its phrasings
(clause templates such as "use exactly {n} bullet points"); a phrasing doubles as the parser, so the
constraints of a stored prompt can always be read back from its text.
"""

from __future__ import annotations

import random
import re

WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")
SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
BULLET = re.compile(r"^\s*[-*]\s+\S", re.M)
TITLE = re.compile(r"<<[^<>\n]+>>")
PLACEHOLDERS = {"n": r"\d+", "lo": r"\d+", "hi": r"\d+", "word": r"[A-Za-z]+", "phrase": r"[^']+"}

# Types an empty-ish answer already meets; a prompt never carries only these.
TRIVIAL = frozenset({"words_at_most", "exclude_word", "lowercase", "no_commas"})


def count_words(text: str) -> int:
    return len(WORD.findall(text))


def count_sentences(text: str) -> int:
    return sum(1 for chunk in SENTENCE_END.split(text) if re.search(r"\w", chunk))


def count_bullets(text: str) -> int:
    return len(BULLET.findall(text))


def has_word(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text, re.I) is not None


def ends_with(text: str, phrase: str) -> bool:
    # Terminal punctuation and case are free: "See you soon." ends with the phrase "see you soon".
    return text.rstrip().rstrip(".!?").lower().endswith(phrase.lower())


CHECKS = {
    "words_at_most": lambda text, a: count_words(text) <= a["n"],
    "words_at_least": lambda text, a: count_words(text) >= a["n"],
    "words_between": lambda text, a: a["lo"] <= count_words(text) <= a["hi"],
    "bullets": lambda text, a: count_bullets(text) == a["n"],
    "sentences": lambda text, a: count_sentences(text) == a["n"],
    "include_word": lambda text, a: has_word(text, a["word"]),
    "exclude_word": lambda text, a: not has_word(text, a["word"]),
    "lowercase": lambda text, a: text == text.lower(),
    "ends_with": lambda text, a: ends_with(text, a["phrase"]),
    "title": lambda text, a: TITLE.search(text) is not None,
    "no_commas": lambda text, a: "," not in text,
}


def check(kind: str, args: dict, text: str) -> bool:
    return CHECKS[kind](text, args)


def draw_args(kind: str, params: dict, rng: random.Random) -> dict:
    """Arguments for one constraint of `kind`, from the ranges and lists in its spec entry."""
    if kind in ("words_at_most", "words_at_least", "bullets", "sentences"):
        return {"n": rng.randint(*params["n"])}
    if kind == "words_between":
        lo = rng.randint(*params["lo"])
        return {"lo": lo, "hi": lo + rng.randint(*params["width"])}
    if kind in ("include_word", "exclude_word"):
        return {"word": rng.choice(params["words"])}
    if kind == "ends_with":
        return {"phrase": rng.choice(params["phrases"])}
    return {}


def phrasing_regex(template: str) -> re.Pattern:
    """'use exactly {n} bullet points' -> a case-blind regex with a named group per placeholder."""
    parts = re.split(r"\{(\w+)\}", template)
    pattern = "".join(
        re.escape(part) if i % 2 == 0 else f"(?P<{part}>{PLACEHOLDERS[part]})" for i, part in enumerate(parts)
    )
    return re.compile(rf"\b{pattern}", re.I)


def read_args(match: re.Match) -> dict:
    return {
        key: int(value) if PLACEHOLDERS[key] == r"\d+" else value.lower() for key, value in match.groupdict().items()
    }
