"""bench/bench_online.py's smoke run on the CPU: both trainers take their steps and the row has its fields."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration  # both trainers in processes of their own
def test_bench_online_times_both_trainers_on_the_tiny_model(tmp_path):
    cmd = [
        sys.executable,
        "bench/bench_online.py",
        "--device",
        "cpu",
        "--tiny",
        "--prompts",
        "4",
        "--n",
        "4",
        "--prompt-len",
        "16",
        "--max-new",
        "16",
        "--steps",
        "2",
        "--set",
        "generation.static.fallback_rows=16",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())
    for name in ("ours", "trl_hf"):
        # A warm-up step and two timed ones, each sampling 16 rollouts of at most 16 tokens.
        assert len(res[name]["steps_s"]) == 3 and all(0 < t <= 16 * 16 for t in res[name]["gen_tokens"])
        assert 0 < res[name]["gen_share"] < 1
    assert res["speedup"] == round(res["trl_hf_step_s"] / res["ours_step_s"], 2) and res["ours_tok_s"] > 0
    assert res["settings"]["logit_std"] == 5.4 and res["ours_top_p_fallback_share"] == 0  # hf: no fallback
    assert res["settings"]["ours_overrides"] == ["generation.static.fallback_rows=16"]
