"""Shaping a step's rows into store records (schema.py): ids added, extra columns left out."""

from __future__ import annotations

import math

from .ids import record_id


def _only(rows, columns):
    """A dataset's rows with only those of `columns` it has: any others (token lists, say) would be
    read for nothing; lists of dicts are taken as they are."""
    if hasattr(rows, "select_columns"):
        return rows.select_columns([c for c in columns if c in rows.column_names])
    return rows


def response_records(rows, iteration: int, step: str, policy: str, rm: str) -> list[dict]:
    """Rows with prompt_id, response, num_tokens and (optionally) score."""
    rows = _only(rows, ("prompt_id", "response", "score", "num_tokens"))
    return [
        {
            "response_id": record_id(r["prompt_id"], iteration, step, policy, r["response"], i),
            "prompt_id": r["prompt_id"],
            "iteration": iteration,
            "step": step,
            "policy": policy,
            "rm": rm if "score" in r else "",
            "response": r["response"],
            "score": float(r.get("score", math.nan)),
            "num_tokens": int(r["num_tokens"]),
        }
        for i, r in enumerate(rows)
    ]


def pair_records(rows, iteration: int, step: str, source: str, extra: tuple[str, ...] = ()) -> list[dict]:
    """Rows with prompt_id, prompt, chosen, rejected, chosen_score, rejected_score (+ `extra` columns)."""
    rows = _only(rows, ("prompt_id", "prompt", "chosen", "rejected", "chosen_score", "rejected_score", *extra))
    return [
        {
            "pair_id": record_id(r["prompt_id"], iteration, step, r["chosen"], r["rejected"]),
            "prompt_id": r["prompt_id"],
            "iteration": iteration,
            "step": step,
            "prompt": r["prompt"],
            "chosen": r["chosen"],
            "rejected": r["rejected"],
            "chosen_score": float(r["chosen_score"]),
            "rejected_score": float(r["rejected_score"]),
            "source": source,
            **{k: r[k] for k in extra},
        }
        for r in rows
    ]


def revision_records(rows, iteration: int, step: str, policy: str) -> list[dict]:
    """Rows with prompt_id, original, revised_flag, revised, original_score, revised_score, kept: one
    record per revised row; `response_id` is the id response_records gives the original in `rows`."""
    records = []
    for i, r in enumerate(rows):
        if r["revised_flag"]:
            response_id = record_id(r["prompt_id"], iteration, step, policy, r["original"], i)
            records.append(
                {
                    "revision_id": record_id(response_id, r["revised"]),
                    "response_id": response_id,
                    "prompt_id": r["prompt_id"],
                    "iteration": iteration,
                    "original": r["original"],
                    "revised": r["revised"],
                    "original_score": float(r["original_score"]),
                    "revised_score": float(r["revised_score"]),
                    "kept": bool(r["kept"]),
                }
            )
    return records


def original_pair_records(pairs, step: str) -> list[dict]:
    """The original pairs as iteration 0's stored pairs: no RM has scored them."""
    unscored = pairs.map(lambda r: {"chosen_score": float("nan"), "rejected_score": float("nan")})
    return pair_records(unscored, 0, step, "original")


def split_pairs(pairs, heldout_share: float, rng):
    """Original pairs with `split` (train | heldout, a `heldout_share` of them held out) and `prompt_id`."""
    from .store import prompt_id

    heldout = [rng.random() < heldout_share for _ in range(len(pairs))]
    pairs = pairs.add_column("split", ["heldout" if h else "train" for h in heldout])
    return pairs.add_column("prompt_id", [prompt_id(p) for p in pairs["prompt"]])
