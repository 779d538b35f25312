"""Time spent loading and saving models and tokenizers, counted while a step phase runs.

Steps hand models to each other as safetensors folders, and the trainers save their checkpoints
themselves, deep inside trl and transformers, where no hook of ours reaches. So the count wraps the
libraries' own load and save methods for the length of a phase, and restores them after.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

# Every model and tokenizer class inherits these; Auto* classes end in them too. A trainer's
# `save_model` writes one checkpoint, the model and its tokenizer: one save, as a checkpoint that
# core/checkpoints.py writes in the background.
CALLS = [
    ("load", PreTrainedModel, "from_pretrained"),
    ("load", PreTrainedTokenizerBase, "from_pretrained"),
    ("save", PreTrainedModel, "save_pretrained"),
    ("save", PreTrainedTokenizerBase, "save_pretrained"),
    ("save", Trainer, "save_model"),
]


# The totals of the phase counting now, for `charge`.
_counting: list[dict] = []


@contextmanager
def counted() -> Iterator[dict]:
    """Yields {"load_s", "loads", "save_s", "saves"}, filled as the wrapped calls return. Only calls
    made on this thread count: another thread's (a checkpoint written in the background) take none of
    the phase's time but what the phase waits for them, which their owner `charge`s."""
    totals = {"load_s": 0.0, "loads": 0, "save_s": 0.0, "saves": 0}
    # A call made inside another (a subclass's override calling its parent's) is part of that one.
    depth = [0]
    originals = [(cls, name, cls.__dict__[name]) for _, cls, name in CALLS]
    for kind, cls, name in CALLS:
        setattr(cls, name, _timed(cls.__dict__[name], kind, totals, depth, threading.get_ident()))
    _counting.append(totals)
    try:
        yield totals
    finally:
        _counting.remove(totals)
        for cls, name, original in originals:
            setattr(cls, name, original)
        totals["load_s"] = round(totals["load_s"], 3)
        totals["save_s"] = round(totals["save_s"], 3)


def charge(kind: str, seconds: float, calls: int = 1) -> None:
    """Counts a load or save made some other way than the wrapped calls, in the phase counting now (if any)."""
    if _counting:
        _counting[-1][f"{kind}_s"] += seconds
        _counting[-1][f"{kind}s"] += calls


def _timed(original, kind: str, totals: dict, depth: list[int], thread: int):
    is_classmethod = isinstance(original, classmethod)
    func = original.__func__ if is_classmethod else original

    @functools.wraps(func)
    def timed(*args, **kwargs):
        if depth[0] or threading.get_ident() != thread:
            return func(*args, **kwargs)
        depth[0] += 1
        start = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            depth[0] -= 1
            totals[f"{kind}_s"] += time.perf_counter() - start
            totals[f"{kind}s"] += 1

    return classmethod(timed) if is_classmethod else timed
