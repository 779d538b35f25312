"""The retrospective stores: every iteration's prompts, responses, pairs, pseudo pairs and revisions.

Layout: RUN/stores/<kind>/iter_<K>/, one HF dataset (save_to_disk) per iteration; loading a kind
concatenates its iterations. Appends are checked against the kind's schema (schema.py).

Atomic per iteration: an iteration is saved to a hidden temporary folder and renamed into place. To
replace an iteration, the old folder is first renamed to .iter_<K>.old; a writer killed between the two
renames leaves that folder, which readers use and the next writer puts back. So a killed writer leaves
every finished iteration readable, and re-appending an iteration (a re-run step) replaces it whole.
One writer per kind at a time.

Dedup, on append of prompts and pairs: a row is dropped when an earlier iteration, or an earlier row
of the same append, has the same id or the same normalised text (ids.normalise) - the prompt for
prompts; prompt_id, chosen and rejected for pairs. So each prompt is stored once, at the iteration it
was first seen (which iterations used it is in responses).

Size cap (max_rows per kind): after an append, rows of the other iterations are evicted until the kind
fits: oldest iteration first, within it the rows of the easiest prompts first (sampling.difficulty;
prompts with no scored response count as hardest), then in row order. The iteration just
written is never evicted, so one iteration larger than the cap leaves the kind above it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from datasets import Dataset, concatenate_datasets, load_from_disk

from .ids import normalise, prompt_id
from .sampling import difficulty
from .schema import FEATURES, empty, validate

__all__ = ["Store", "prompt_id"]

log = logging.getLogger(__name__)

_ITER = re.compile(r"^(\.?)iter_(\d+)(\.old)?$")


class Store:
    """`writer=False` for all but one of several processes running a step: their appends do nothing,
    the one writer appends once for all (StepRun.store)."""

    def __init__(self, run_dir: str | Path, max_rows: dict[str, int] | None = None, writer: bool = True):
        self.root = Path(run_dir) / "stores"
        self.max_rows = max_rows or {}
        self.writer = writer

    def append(self, kind: str, iteration: int, records: list[dict] | Dataset) -> None:
        """Write `records` as iteration `iteration` of `kind`, replacing what that iteration held."""
        if not self.writer:
            return
        rows = validate(kind, iteration, records)
        earlier = self.load(kind, [k for k in self.iterations(kind) if k < iteration])
        rows = _drop_duplicates(kind, rows, earlier)
        if len(rows) < len(records):
            log.info("%s iteration %d: %d duplicates dropped", kind, iteration, len(records) - len(rows))
        self._write(kind, iteration, rows)
        if kind in self.max_rows:
            self._evict(kind, iteration, self.max_rows[kind])

    def load(self, kind: str, iterations: list[int] | None = None) -> Dataset:
        """The kind's rows of the given iterations (all if None), oldest iteration first."""
        folders = self._folders(kind)
        wanted = sorted(folders) if iterations is None else sorted(set(iterations) & set(folders))
        parts = [load_from_disk(str(folders[k])) for k in wanted]
        if len(parts) == 1:
            return parts[0]  # concatenating one dataset costs more than loading it
        return concatenate_datasets(parts) if parts else empty(kind)

    def iterations(self, kind: str) -> list[int]:
        return sorted(self._folders(kind))

    def _folders(self, kind: str) -> dict[int, Path]:
        if kind not in FEATURES:
            raise ValueError(f"unknown kind {kind!r}; kinds are {', '.join(FEATURES)}")
        kind_dir = self.root / kind
        folders: dict[int, Path] = {}
        for path in kind_dir.iterdir() if kind_dir.is_dir() else []:
            m = _ITER.match(path.name)
            if m and bool(m[1]) == bool(m[3]):  # iter_K, or .iter_K.old left by a killed writer
                k = int(m[2])
                if not m[3] or k not in folders:
                    folders[k] = path
        return folders

    def _write(self, kind: str, iteration: int, rows: Dataset) -> None:
        kind_dir = self.root / kind
        kind_dir.mkdir(parents=True, exist_ok=True)
        _recover(kind_dir)
        final, old = kind_dir / f"iter_{iteration}", kind_dir / f".iter_{iteration}.old"
        tmp = Path(tempfile.mkdtemp(prefix=f".iter_{iteration}.tmp-", dir=kind_dir))
        # An empty dataset saved with the default of 0 shards cannot be loaded back.
        rows.save_to_disk(str(tmp), num_shards=1 if len(rows) == 0 else None)
        _fsync_tree(tmp)
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(kind_dir)
        shutil.rmtree(old, ignore_errors=True)

    def _evict(self, kind: str, written: int, cap: int) -> None:
        others = {k: self.load(kind, [k]) for k in self.iterations(kind) if k != written}
        excess = len(self.load(kind, [written])) + sum(map(len, others.values())) - cap
        if excess <= 0:
            return
        hardness = difficulty(self.load("responses"))
        order = sorted(
            (k, hardness.get(pid, 1.0), i) for k, rows in others.items() for i, pid in enumerate(rows["prompt_id"])
        )
        evicted: dict[int, set[int]] = {}
        for k, _, i in order[:excess]:
            evicted.setdefault(k, set()).add(i)
        for k, gone in evicted.items():
            rows = others[k]
            self._write(kind, k, rows.select([i for i in range(len(rows)) if i not in gone]))
            log.info("%s iteration %d: %d rows evicted (cap %d)", kind, k, len(gone), cap)


def _drop_duplicates(kind: str, rows: Dataset, earlier: Dataset) -> Dataset:
    if kind not in ("prompts", "pairs"):
        return rows
    id_column = "prompt_id" if kind == "prompts" else "pair_id"
    seen_ids = set(earlier[id_column])
    seen_texts = set(_text_keys(kind, earlier))
    keep = []
    for i, (row_id, key) in enumerate(zip(rows[id_column], _text_keys(kind, rows))):
        if row_id not in seen_ids and key not in seen_texts:
            keep.append(i)
        seen_ids.add(row_id)
        seen_texts.add(key)
    return rows.select(keep) if len(keep) < len(rows) else rows


def _text_keys(kind: str, rows: Dataset) -> list:
    if kind == "prompts":
        return [normalise(p) for p in rows["prompt"]]
    texts = zip(rows["prompt_id"], rows["chosen"], rows["rejected"])
    return [(pid, normalise(chosen), normalise(rejected)) for pid, chosen, rejected in texts]


def _recover(kind_dir: Path) -> None:
    """Undo what a killed writer left: put back an .old folder whose replacement never arrived, and
    remove .old folders already replaced and half-written temporary folders."""
    for path in kind_dir.iterdir():
        if path.name.startswith(".iter_") and path.name.endswith(".old"):
            final = kind_dir / path.name[1 : -len(".old")]
            if final.exists():
                shutil.rmtree(path)
            else:
                os.rename(path, final)
        elif path.name.startswith(".iter_") and ".tmp-" in path.name:
            shutil.rmtree(path)


def _fsync_tree(folder: Path) -> None:
    """Flush the saved files, so a crash of the machine (not only of the writer) cannot leave a renamed
    but empty iteration."""
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
