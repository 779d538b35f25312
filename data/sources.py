"""Reading prompts, preference pairs and demonstrations from any HF `datasets` source, and checking
them before any training starts: every error names the source, the row and the column."""
from __future__ import annotations

from pathlib import Path

import datasets

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    pass


def load_source(path: str, name: str | None = None, split: str = "train") -> datasets.Dataset:
    """A `save_to_disk` folder, a local json/jsonl/parquet/csv file, or a hub id (with name/split)."""
    local = Path(path)
    try:
        if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()):
            loaded = datasets.load_from_disk(str(local))
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        if local.suffix in LOCAL_FORMATS:
            if not local.exists():
                raise DataError(f"{path}: file not found")
            return datasets.load_dataset(LOCAL_FORMATS[local.suffix], data_files=str(local), split="train")
        return datasets.load_dataset(path, name, split=split)
    except DataError:
        raise
    except Exception as err:  # datasets raises many kinds; the user needs the source named, not the kind
        raise DataError(f"{path}: cannot load as a dataset ({type(err).__name__}: {err})") from None


def select_columns(ds: datasets.Dataset, source: str, columns: dict[str, str]) -> datasets.Dataset:
    """Rename the configured columns to our names (`columns` maps ours -> theirs) and check them."""
    missing = [theirs for theirs in columns.values() if theirs not in ds.column_names]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; it has {ds.column_names} (set the *_column fields)")
    ds = ds.select_columns(list(columns.values()))
    ds = ds.rename_columns({theirs: ours for ours, theirs in columns.items() if ours != theirs})
    conversational = [ours for ours in columns if not isinstance(ds.features[ours], datasets.Value)]
    if conversational:
        ds = ds.map(lambda r: {c: _message_text(r[c], "user" if c == "prompt" else "assistant") for c in conversational})
    for row, record in enumerate(ds):
        for ours, theirs in columns.items():
            value = record[ours]
            if not isinstance(value, str):
                raise DataError(f"{source}: row {row}, column {theirs!r}: expected a string, got {type(value).__name__} {value!r}")
            if not value.strip():
                raise DataError(f"{source}: row {row}, column {theirs!r}: empty text")
        if "chosen" in record and record["chosen"] == record.get("rejected"):
            raise DataError(f"{source}: row {row}: chosen equals rejected")
    return ds


def _message_text(value, role: str):
    """A conversational cell (a list of {role, content} messages, as in UltraFeedback) as plain text:
    the last message of `role`. Anything else is returned as is, for the checks to name."""
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        contents = [m["content"] for m in value if m.get("role") == role]
        return contents[-1] if contents else None
    return value
