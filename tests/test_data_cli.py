"""`coevolve data show|export` on a real run directory."""
from __future__ import annotations

import subprocess
import sys

import datasets


def coevolve(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coevolve", *args], capture_output=True, text=True, check=True)


def test_show_and_export_round_trip(prepared_run, tmp_path):
    shown = coevolve("data", "show", str(prepared_run)).stdout
    assert "prompts: 120 rows" in shown and "iter 0: 120" in shown
    out = tmp_path / "pairs.jsonl"
    assert coevolve("data", "export", str(prepared_run), "--kind", "pairs", "--format", "jsonl", "--out", str(out)).stdout.strip() == str(out)
    exported = datasets.load_dataset("json", data_files=str(out), split="train")
    original = datasets.load_from_disk(str(prepared_run / "iter_0/init/data/pairs"))
    # trl reads prompt/chosen/rejected directly; every original pair is there once.
    assert sorted(zip(exported["prompt"], exported["chosen"], exported["rejected"])) == sorted(
        zip(original["prompt"], original["chosen"], original["rejected"])
    )
    assert set(exported["source"]) == {"original"}
