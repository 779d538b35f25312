"""bench/bench_training.py --epoch's smoke run on the CPU: a whole DPO epoch per process, trl's and ours'
uncompiled, and the `training` row's fields. Its compiled runs' cold and warm caches are what
tests/test_compile.py shows for a step (the second e-step loads what the first compiled); compiling
twice more here would double the test's time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_epoch_times_whole_epochs_from_process_start(tmp_path):
    cmd = [sys.executable, "bench/bench_training.py", "--epoch", "--epoch-runs", "trl_tuned,ours_eager"]
    cmd += ["--model", "tiny", "--pairs", "48", "--batch", "8"]
    cmd += ["--max-len", "64", "--loop-skip", "2", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "result.json").read_text())
    assert res["errors"] == {}
    m = res["measurements"]
    for r in m.values():
        # The whole epoch, from the process's start: every pair once, the start before the first step.
        assert r["steps"] == 6 and r["batch_pairs"] == 8 and not r["gradient_checkpointing"]
        assert 0 < r["start_to_imported_s"] < r["start_to_first_step_s"] < r["epoch_s"] < r["process_wall_s"]
        assert r["tok_s_end_to_end"] == pytest.approx(r["tokens"] / r["epoch_s"], rel=0.01)
        assert r["loop_tok_s"] > r["tok_s_end_to_end"] and r["loop_steps"] == 3
    # The same pairs and the same tokens for both.
    assert set(m) == {"trl_tuned", "ours_eager"} and len({r["tokens"] for r in m.values()}) == 1
    assert not m["trl_tuned"]["compiled"] and not m["ours_eager"]["compiled"]
    # The row.
    assert res["trl_dpo_tuned_tok_s"] == m["trl_tuned"]["tok_s_end_to_end"]
    assert res["dpo_tok_s_end_to_end_eager"] == m["ours_eager"]["tok_s_end_to_end"]
    eager_speedup = round(res["dpo_tok_s_end_to_end_eager"] / res["trl_dpo_tuned_tok_s"], 2)
    assert res["dpo_speedup_end_to_end_eager"] == eager_speedup
    assert "end-to-end tok/s" in done.stdout and "loop tok/s" in done.stdout


@pytest.mark.slow
def test_bench_lora_trains_adapters_on_a_bf16_base_and_fills_the_row(tmp_path):
    cmd = [sys.executable, "bench/bench_training.py", "--model", "tiny", "--lora", "--dpo-batch", "4"]
    cmd += ["--rm-batch", "4", "--warmup", "1", "--steps", "2", "--out", str(tmp_path / "out")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "result.json").read_text())
    assert res["errors"] == {}
    runs = res["runs"]
    assert res["lora"] and set(runs) == {"ours-dpo-lora", "ours-rm-lora"}
    for r in runs.values():
        assert r["lora"].startswith("r 16, alpha 32, all-linear") and r["weights_dtype"] == "bfloat16"
        assert r["gradient_checkpointing"] and r["steps"] == 3 and r["timed_steps"] == 2
    # Adapters only: r 16 x (inputs + outputs) of the 7 linear layers of each of the 2 layers (hidden 64,
    # kv 32, MLP 128); the RM's score head (1 x hidden) is trained in full beside them.
    adapters = 2 * 16 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
    assert runs["ours-dpo-lora"]["trained_params"] == adapters
    assert runs["ours-rm-lora"]["trained_params"] == adapters + 64
    assert runs["ours-dpo-lora"]["reference"] == "sampled"
    # Each config's models are gone before the next one starts (its peak memory is its own).
    assert [r["models_left"] for r in runs.values()] == [0, 0]
    assert res["dpo_tok_s"] == runs["ours-dpo-lora"]["steady_tok_s"] > 0
    assert res["rm_tok_s"] == runs["ours-rm-lora"]["steady_tok_s"] > 0
    # No matmul rate on a CPU, so no MFU; the table has its LoRA column all the same.
    assert res["dpo_mfu_4n"] is None and "MFU (4N, LoRA)" in done.stdout
