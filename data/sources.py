"""Reading prompts, preference pairs and demonstrations from any HF `datasets` source, and checking
them before any training starts: every error names the source, the row and the column."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from coevolve.core import hub
from coevolve.core.errors import InputError

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(InputError):
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
            # Checked first: datasets may load such a file and fail only when a row is read, naming neither.
            bad = _bad_line(local) if local.suffix != ".parquet" else None
            if bad:
                raise DataError(f"{path}: {bad}")
            return datasets.load_dataset(LOCAL_FORMATS[local.suffix], data_files=str(local), split="train")
        if local.exists() or hub.reachable():
            return datasets.load_dataset(path, name, split=split)
        if hub.looks_like_path(path):
            raise DataError(f"{path}: no such file or folder")
        with hub.offline():
            try:
                return datasets.load_dataset(path, name, split=split)
            except Exception:
                raise DataError(
                    f"{path}: not in the local datasets cache, with the hub offline or unreachable; "
                    "give a local file or folder"
                ) from None
    except DataError:
        raise
    except Exception as err:  # datasets raises many kinds; the user needs the source named, not the kind
        raise DataError(f"{path}: cannot load as a dataset ({type(err).__name__}: {err})") from None


def _bad_line(file: Path) -> str | None:
    """The first line of a text file that is not UTF-8 or (JSON Lines) not a JSON value, for the error:
    datasets names neither the file nor the line (pyarrow's decode error, or a log line above it)."""
    with file.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"line {number}, column {err.start + 1}: not UTF-8 text (byte 0x{raw[err.start]:02x})"
            if file.suffix == ".csv" or not text.strip():
                continue
            try:
                json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                if (
                    number == 1
                    and file.suffix == ".json"
                    and text.lstrip().startswith(("[", "{"))
                    and not text.rstrip().endswith(("]", "}"))
                ):
                    return None  # one JSON document over several lines: not JSON Lines, nothing to point at by line
                return f"line {number}, column {err.colno}: not valid JSON ({err.msg.removesuffix(' at')})"
    return None


def select_columns(ds: datasets.Dataset, source: str, columns: dict[str, str]) -> datasets.Dataset:
    """Rename the configured columns to our names (`columns` maps ours -> theirs) and check them."""
    missing = [theirs for theirs in columns.values() if theirs not in ds.column_names]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; it has {ds.column_names} (set the *_column fields)")
    ds = ds.select_columns(list(columns.values()))
    ds = ds.rename_columns({theirs: ours for ours, theirs in columns.items() if ours != theirs})
    conversational = [ours for ours in columns if not isinstance(ds.features[ours], datasets.Value)]
    if conversational:
        ds = ds.map(
            lambda r: {c: _message_text(r[c], "user" if c == "prompt" else "assistant") for c in conversational}
        )
    for row, record in enumerate(ds):
        for ours, theirs in columns.items():
            value = record[ours]
            if not isinstance(value, str):
                raise DataError(
                    f"{source}: row {row}, column {theirs!r}: expected a string, got {type(value).__name__} {value!r}"
                )
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
