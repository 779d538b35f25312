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
    assert coevolve(
        "data", "export", str(prepared_run), "--kind", "pairs", "--format", "jsonl", "--out", str(out)
    ).stdout.strip() == str(out)
    exported = datasets.load_dataset("json", data_files=str(out), split="train")
    original = datasets.load_from_disk(str(prepared_run / "iter_0/init/data/pairs"))
    # trl reads prompt/chosen/rejected directly; every original pair is there once.
    assert sorted(zip(exported["prompt"], exported["chosen"], exported["rejected"])) == sorted(
        zip(original["prompt"], original["chosen"], original["rejected"])
    )
    assert set(exported["source"]) == {"original"}


def refused(*args) -> str:
    proc = subprocess.run([sys.executable, "-m", "coevolve", *args], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("coevolve: error: ")
    return lines[0]


def test_show_and_export_refuse_a_folder_that_is_no_run(tmp_path):
    missing = tmp_path / "no-run"
    assert f"{missing}: no such run directory" in refused("data", "export", str(missing), "--kind", "pairs")
    assert f"{missing}: no such run directory" in refused("data", "show", str(missing))
    assert not missing.exists()
    (tmp_path / "empty").mkdir()
    assert "holds no stores" in refused("data", "show", str(tmp_path / "empty"))
    assert sorted(tmp_path.iterdir()) == [tmp_path / "empty"] and not any((tmp_path / "empty").iterdir())


def test_export_of_an_empty_store_writes_nothing(tmp_path):
    run = tmp_path / "run"
    (run / "stores").mkdir(parents=True)
    assert f"{run}: the pairs store is empty; nothing exported" in refused(
        "data", "export", str(run), "--kind", "pairs"
    )
    assert "--kind 'pair': kinds are prompts" in refused("data", "export", str(run), "--kind", "pair")
    assert sorted(p.name for p in run.iterdir()) == ["stores"]
