"""What `coevolve data show` prints and `coevolve data export` writes.

Exports of pairs and pseudo_pairs put `prompt`, `chosen`, `rejected` first (trl's preference format,
plain text) and keep every other column, ids included. Pseudo pairs include the dropped ones: filter
on `kept`. To train on an export:

- trl: `ds = load_dataset("json", data_files="pairs.jsonl", split="train")` (or "parquet"), then
  `DPOTrainer(..., train_dataset=ds.select_columns(["prompt", "chosen", "rejected"]))`; the same
  columns suit `RewardTrainer`.
- OpenRLHF: `--dataset pairs.jsonl --prompt_key prompt --chosen_key chosen --rejected_key rejected`
  (add `--apply_chat_template` only if the texts are not already chat-rendered).

JSON has no NaN: unscored scores come back as null.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
from datasets import Dataset

from .sampling import difficulty
from .schema import FEATURES, KINDS
from .sources import DataError
from .store import Store

FORMATS = ("jsonl", "parquet")
_TRL_FIRST = ["prompt", "chosen", "rejected"]


def export(run_dir: str | Path, kind: str, fmt: str, out_path: str | Path) -> Path:
    """Write every stored row of `kind` to `out_path` as jsonl or parquet; returns the path."""
    if fmt not in FORMATS:
        raise DataError(f"--format {fmt!r}: formats are {', '.join(FORMATS)}")
    if kind not in KINDS:
        raise DataError(f"--kind {kind!r}: kinds are {', '.join(KINDS)}")
    rows = _store(run_dir).load(kind)
    if not len(rows):
        raise DataError(f"{run_dir}: the {kind} store is empty; nothing exported")
    if "chosen" in FEATURES[kind]:
        rows = rows.select_columns(_TRL_FIRST + [c for c in rows.column_names if c not in _TRL_FIRST])
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed, so a reader never sees half a file.
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if fmt == "jsonl":
        rows.to_json(str(tmp), lines=True, force_ascii=False)
    else:
        rows.to_parquet(str(tmp))
    os.replace(tmp, out)
    return out


def summary(run_dir: str | Path, bins: int = 10) -> str:
    """Rows per kind and iteration, mean response score and kept pseudo pairs per iteration, and a
    histogram of prompt difficulty."""
    store = _store(run_dir)
    lines = [f"stores: {store.root}", ""]
    for kind in KINDS:
        iterations = store.iterations(kind)
        rows = {k: store.load(kind, [k]) for k in iterations}
        lines.append(f"{kind}: {sum(map(len, rows.values()))} rows")
        for k, part in rows.items():
            lines.append(f"  iter {k}: {len(part)}{_detail(kind, part)}")
    hardness = list(difficulty(store.load("responses")).values())
    lines += ["", f"prompt difficulty (latest scored iteration; 1 = hardest): {len(hardness)} prompts"]
    if hardness:
        counts, edges = np.histogram(hardness, bins=bins, range=(0.0, 1.0))
        width = 40 / max(counts.max(), 1)
        for count, lo, hi in zip(counts, edges, edges[1:]):
            lines.append(f"  {lo:.1f}-{hi:.1f} {'#' * round(count * width):<40} {count}")
    return "\n".join(lines)


def _store(run_dir: str | Path) -> Store:
    # Reading a folder that is no run would show nothing, or write an export into a folder made for it.
    if not Path(run_dir).is_dir():
        raise DataError(f"{run_dir}: no such run directory")
    store = Store(run_dir)
    if not store.root.is_dir():
        raise DataError(f"{run_dir}: holds no stores (no step of a run has written there)")
    return store


def _detail(kind: str, rows: Dataset) -> str:
    if kind == "responses":
        scores = np.asarray(rows["score"], dtype=float)
        scored = scores[~np.isnan(scores)]
        return f"  ({len(scored)} scored, mean score {scored.mean():.3f})" if len(scored) else "  (unscored)"
    if kind in ("pseudo_pairs", "revisions"):
        return f"  ({sum(rows['kept'])} kept)"
    if kind == "pairs" and len(rows):
        return "  (" + ", ".join(f"{s} {n}" for s, n in sorted(Counter(rows["source"]).items())) + ")"
    return ""
