"""Record schemas of the stores, and the check every write goes through.

A row is rejected when a column is missing or extra, a value has the wrong type, an id or a text is
empty (or only whitespace), a prompt's split is unknown, or its iteration does not fit the iteration
it is written to. The error names the kind, the iteration, the row index and the column.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np
from datasets import Dataset, Features, Value

STR, INT, FLOAT, BOOL = Value("string"), Value("int64"), Value("float64"), Value("bool")

_PAIR = {
    "pair_id": STR,
    "prompt_id": STR,
    "iteration": INT,
    "step": STR,
    "prompt": STR,
    "chosen": STR,
    "rejected": STR,
    "chosen_score": FLOAT,
    "rejected_score": FLOAT,
    "source": STR,  # "e-step", "original", "revision", ...
}

# Scores are NaN where nothing scored the text (an unscored response, an original pair without
# ratings); `rm` is "" then. Checkpoint paths (`policy`, `rm`) are relative to RUN.
FEATURES: dict[str, Features] = {
    "prompts": Features({"prompt_id": STR, "prompt": STR, "split": STR, "iteration": INT}),
    "responses": Features(
        {
            "response_id": STR,
            "prompt_id": STR,
            "iteration": INT,
            "step": STR,
            "policy": STR,
            "rm": STR,
            "response": STR,
            "score": FLOAT,
            "num_tokens": INT,
        }
    ),
    "pairs": Features(_PAIR),
    "pseudo_pairs": Features({**_PAIR, "delta": FLOAT, "epsilon": FLOAT, "kept": BOOL, "reason": STR}),
    "revisions": Features(
        {
            "revision_id": STR,
            "response_id": STR,
            "prompt_id": STR,
            "iteration": INT,
            "original": STR,
            "revised": STR,
            "original_score": FLOAT,
            "revised_score": FLOAT,
            "kept": BOOL,
        }
    ),
}
KINDS = tuple(FEATURES)

# Columns that must hold non-blank text, besides every `*_id` column. Generated text (response,
# chosen, rejected, original, revised) may be empty: a policy that stops at once is an outcome to keep.
_TEXT = {"prompt", "step", "policy"}
SPLITS = ("policy", "rm", "select", "eval")


def empty(kind: str) -> Dataset:
    return Dataset.from_dict({c: [] for c in FEATURES[kind]}, features=FEATURES[kind])


def validate(kind: str, iteration: int, records: list[dict] | Dataset) -> Dataset:
    """The records as a typed Dataset, or ValueError naming the first offending row and column."""
    if kind not in FEATURES:
        raise ValueError(f"unknown kind {kind!r}; kinds are {', '.join(KINDS)}")
    columns = list(FEATURES[kind])

    def fail(row: int, column: str, problem: str):
        raise ValueError(f"{kind} iteration {iteration}: row {row}, column {column!r}: {problem}")

    if isinstance(records, Dataset):
        _check_columns(records.column_names, columns, lambda c, p: fail(0, c, p))
        data = records.select_columns(columns).to_dict()
    else:
        for i, row in enumerate(records):
            _check_columns(list(row), columns, lambda c, p, i=i: fail(i, c, p))
        data = {c: [row[c] for row in records] for c in columns}

    for column in columns:
        check = _check_value(column, FEATURES[kind][column], iteration, kind)
        for i, value in enumerate(data[column]):
            problem = check(value)
            if problem:
                fail(i, column, problem)
    return Dataset.from_dict(data, features=FEATURES[kind])


def _check_columns(got: list[str], want: list[str], fail) -> None:
    for c in want:
        if c not in got:
            fail(c, "missing column")
    for c in got:
        if c not in want:
            fail(c, f"extra column (columns are {', '.join(want)})")


def _check_value(column: str, feature: Value, iteration: int, kind: str):
    """A function returning what is wrong with one value of the column, or None."""
    dtype = feature.dtype
    must_have_text = column in _TEXT or column.endswith("_id")

    def check(v):
        if dtype == "string":
            if not isinstance(v, str):
                return f"expected str, got {type(v).__name__} {v!r}"
            if must_have_text and not v.strip():
                return "empty text" if column in _TEXT else "empty id"
            if column == "split" and v not in SPLITS:
                return f"split must be one of {', '.join(SPLITS)}, got {v!r}"
        elif dtype == "int64":
            if not isinstance(v, Integral) or isinstance(v, (bool, np.bool_)):
                return f"expected int, got {type(v).__name__} {v!r}"
            # A prompt keeps the iteration it was first seen in, so it may be older than this write.
            if column == "iteration" and (v > iteration if kind == "prompts" else v != iteration):
                return f"iteration {v} does not fit a write to iteration {iteration}"
        elif dtype == "float64":
            if not isinstance(v, Real) or isinstance(v, (bool, np.bool_)):
                return f"expected float (NaN if unscored), got {type(v).__name__} {v!r}"
            if math.isinf(v):
                return f"expected a finite float or NaN, got {v!r}"
        elif dtype == "bool" and not isinstance(v, (bool, np.bool_)):
            return f"expected bool, got {type(v).__name__} {v!r}"
        return None

    return check
