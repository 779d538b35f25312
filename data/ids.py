"""Stable ids and the text normalisation that dedup and `prompt_id` share.

Ids are short content hashes, so the same record gets the same id in every run and on every machine,
and a response can be traced to its prompt without a lookup table.
"""

from __future__ import annotations

import hashlib
import re

# Sentence punctuation only: operators and brackets stay, so "2+2" and "2-2" (or two code prompts
# differing by a bracket) stay distinct. A '.' or ',' between digits stays too ("3.5" is not "35").
_PUNCTUATION = r"[.,;:!?\"'`‘’“”…]"
_STRIP = re.compile(rf"(?<!\d){_PUNCTUATION}|{_PUNCTUATION}(?!\d)")
_SPACES = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Lowercase, sentence punctuation removed, whitespace collapsed."""
    return _SPACES.sub(" ", _STRIP.sub("", text.lower())).strip()


def record_id(*parts) -> str:
    """Hash of the parts, e.g. `record_id(prompt_id, iteration, step, policy, response, index)` for a
    response. The separator cannot occur in ordinary text, so ("a", "bc") and ("ab", "c") differ."""
    joined = "\x1f".join(str(p) for p in parts)
    return hashlib.blake2b(joined.encode(), digest_size=8).hexdigest()


def prompt_id(text: str) -> str:
    """The prompt's id: a hash of its normalised text, so near-identical prompts share one id."""
    return record_id(normalise(text))
