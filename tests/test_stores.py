"""The retrospective stores in `data/`: schema checks, atomic appends, dedup and the cap, difficulty,
retrospective prompt sampling, the RM's replay mix, and export."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from coevolve.data.export import export, summary
from coevolve.data.ids import record_id
from coevolve.data.sampling import difficulty, replay_mix, sample_prompts
from coevolve.data.schema import FEATURES
from coevolve.data.store import Store, prompt_id
from datasets import Dataset

POLICY, RM = "iter_0/init/policy", "iter_0/init/rm"


def prompt_row(text: str, iteration: int, split: str = "policy") -> dict:
    return {"prompt_id": prompt_id(text), "prompt": text, "split": split, "iteration": iteration}


def response_row(pid: str, iteration: int, score: float, index: int = 0, rm: str = RM, step: str = "e-step") -> dict:
    text = f"answer {index} to {pid}"
    return {
        "response_id": record_id(pid, iteration, step, POLICY, text, index),
        "prompt_id": pid,
        "iteration": iteration,
        "step": step,
        "policy": POLICY,
        "rm": rm,
        "response": text,
        "score": score,
        "num_tokens": 4,
    }


def pair_row(iteration: int, i: int, source: str = "e-step", tag: str = "") -> dict:
    prompt = f"prompt {i}"
    chosen, rejected = f"good answer {i} {tag}", f"bad answer {i} {tag}"
    return {
        "pair_id": record_id(prompt_id(prompt), chosen, rejected),
        "prompt_id": prompt_id(prompt),
        "iteration": iteration,
        "step": "e-step",
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "chosen_score": 1.0,
        "rejected_score": -1.0,
        "source": source,
    }


def pseudo_row(iteration: int, i: int, kept: bool = True) -> dict:
    row = pair_row(iteration, i, source="m-step", tag=f"pseudo {iteration}")
    return {**row, "delta": 0.3, "epsilon": 0.5, "kept": kept, "reason": "" if kept else "delta <= -epsilon"}


def pair_rows(iteration: int, tag: str = "") -> list[dict]:
    return [pair_row(iteration, i, tag=f"{iteration} {tag}") for i in range(3)]


# --- store: append, load, schema ---------------------------------------------------------------


def test_append_and_load_every_kind(tmp_path):
    store = Store(tmp_path)
    pid = prompt_id("prompt 0")
    resp = response_row(pid, 1, 0.5)
    one = {
        "prompts": [prompt_row("prompt 0", 1)],
        "responses": [resp],
        "pairs": [pair_row(1, 0)],
        "pseudo_pairs": [pseudo_row(1, 0)],
        "revisions": [
            {
                "revision_id": record_id(resp["response_id"], "better"),
                "response_id": resp["response_id"],
                "prompt_id": pid,
                "iteration": 1,
                "original": resp["response"],
                "revised": "better",
                "original_score": 0.5,
                "revised_score": 0.9,
                "kept": True,
            }
        ],
    }
    for kind, rows in one.items():
        assert len(store.load(kind)) == 0 and store.load(kind).features == FEATURES[kind]
        store.append(kind, 1, rows)
        assert store.load(kind).to_list() == rows and store.iterations(kind) == [1]
    store.append("responses", 2, [response_row(pid, 2, float("nan"), rm="")])
    assert store.iterations("responses") == [1, 2]
    assert store.load("responses")["iteration"] == [1, 2]
    assert math.isnan(store.load("responses", [2])["score"][0])
    assert (tmp_path / "stores" / "responses" / "iter_2").is_dir()


@pytest.mark.parametrize(
    "change, column, problem",
    [
        (lambda r: r.pop("score"), "score", "missing column"),
        (lambda r: r.update(extra=1), "extra", "extra column"),
        (lambda r: r.update(score="high"), "score", "expected float"),
        (lambda r: r.update(num_tokens=True), "num_tokens", "expected int"),
        (lambda r: r.update(step="  \n"), "step", "empty text"),
        (lambda r: r.update(response_id=""), "response_id", "empty id"),
        (lambda r: r.update(prompt_id=None), "prompt_id", "expected str"),
        (lambda r: r.update(iteration=2), "iteration", "does not fit"),
    ],
)
def test_schema_violation_names_kind_iteration_row_and_column(tmp_path, change, column, problem):
    rows = [response_row(f"p{i}", 1, 0.1 * i, i) for i in range(4)]
    change(rows[2])
    store = Store(tmp_path)
    with pytest.raises(ValueError) as err:
        store.append("responses", 1, rows)
    message = str(err.value)
    assert "responses iteration 1" in message and "row 2" in message
    assert repr(column) in message and problem in message
    assert store.iterations("responses") == []


def test_empty_generated_text_is_kept(tmp_path):
    store = Store(tmp_path)
    store.append("responses", 1, [{**response_row("p0", 1, 0.1, 0), "response": ""}])
    assert store.load("responses")["response"] == [""]


def test_schema_checks_datasets_and_prompt_fields(tmp_path):
    store = Store(tmp_path)
    bad = Dataset.from_list([pair_row(1, 0), {**pair_row(1, 1), "prompt": ""}])
    with pytest.raises(ValueError, match=r"pairs iteration 1: row 1, column 'prompt': empty text"):
        store.append("pairs", 1, bad)
    with pytest.raises(ValueError, match=r"row 0, column 'split'"):
        store.append("prompts", 1, [prompt_row("x", 1, split="train")])
    with pytest.raises(ValueError, match="unknown kind"):
        store.append("scores", 1, [])
    # A prompt keeps the iteration it was first seen in, which may be older than the write.
    store.append("prompts", 3, [prompt_row("seen before", 1)])
    assert store.load("prompts")["iteration"] == [1]


def test_reappending_an_iteration_replaces_it(tmp_path):
    store = Store(tmp_path)
    store.append("pairs", 1, pair_rows(1))
    store.append("pairs", 2, pair_rows(2, "first run"))
    store.append("pairs", 2, pair_rows(2, "re-run")[:2])
    assert store.load("pairs", [2]).to_list() == pair_rows(2, "re-run")[:2]
    assert store.load("pairs", [1]).to_list() == pair_rows(1)
    assert sorted(p.name for p in (tmp_path / "stores" / "pairs").iterdir()) == ["iter_1", "iter_2"]


# --- dedup and the size cap --------------------------------------------------------------------


def test_dedup_exact_and_normalised_text(tmp_path):
    store = Store(tmp_path)
    store.append("prompts", 1, [prompt_row("What is 2+2?", 1), prompt_row("Tell me a joke.", 1)])
    store.append(
        "prompts",
        2,
        [
            prompt_row("What is 2+2?", 2),  # exact
            prompt_row("  what IS 2+2 ", 2),  # case, spacing, punctuation
            {**prompt_row("Tell me a joke!", 2), "prompt_id": "other-id"},  # same text, other id
            prompt_row("What is 2-2?", 2),  # an operator is not punctuation
            prompt_row("What is 3.5?", 2),
            prompt_row("What is 35?", 2),  # nor a decimal point
            prompt_row("what is 2-2", 2),  # duplicate within the append
        ],
    )
    assert store.load("prompts", [2])["prompt"] == ["What is 2-2?", "What is 3.5?", "What is 35?"]

    store.append("pairs", 1, [pair_row(1, 0)])
    again = [{**pair_row(2, 0), "chosen": pair_row(2, 0)["chosen"].upper() + "!", "pair_id": "x"}, pair_row(2, 1)]
    store.append("pairs", 2, again)
    assert store.load("pairs", [2])["pair_id"] == [pair_row(2, 1)["pair_id"]]

    responses = [response_row("p", 1, 0.0), response_row("p", 1, 0.0)]
    store.append("responses", 1, responses)
    assert len(store.load("responses")) == 2  # only prompts and pairs are deduplicated


def test_size_cap_evicts_oldest_iterations_easiest_prompts_first(tmp_path):
    store = Store(tmp_path, max_rows={"prompts": 5})
    texts = {k: [f"iteration {k} prompt {i}" for i in range(3)] for k in (1, 2)}
    # Iteration 1's prompt 0 scores best (easiest), prompt 2 worst; prompt 1 is never scored.
    store.append(
        "responses", 1, [response_row(prompt_id(texts[1][0]), 1, 2.0), response_row(prompt_id(texts[1][2]), 1, -2.0)]
    )
    store.append("prompts", 1, [prompt_row(t, 1) for t in texts[1]])
    store.append("prompts", 2, [prompt_row(t, 2) for t in texts[2][:2]])
    assert len(store.load("prompts")) == 5
    store.append("prompts", 3, [prompt_row("iteration 3 prompt", 3)])
    kept = store.load("prompts")["prompt"]
    assert len(kept) == 5 and texts[1][0] not in kept  # the easiest of the oldest went first
    store.append("prompts", 4, [prompt_row(f"iteration 4 prompt {i}", 4) for i in range(2)])
    kept = store.load("prompts")["prompt"]
    # Then the scored hard one, then the never-scored one (counted hardest); iteration 4 stays whole.
    assert texts[1][2] not in kept and texts[1][1] not in kept and len(kept) == 5
    assert store.load("prompts", [4])["prompt"] == ["iteration 4 prompt 0", "iteration 4 prompt 1"]


# --- difficulty --------------------------------------------------------------------------------


def test_difficulty_ranks_low_mean_and_small_margin_as_hard():
    rows = [response_row("low", 1, s, i) for i, s in enumerate([-1.0, -1.1])]
    rows += [response_row("high", 1, s, i) for i, s in enumerate([3.0, 3.1])]
    rows += [response_row("mid-wide", 1, s, i) for i, s in enumerate([-2.0, 5.0])]
    rows += [response_row("mid-narrow", 1, s, i) for i, s in enumerate([1.4, 1.6])]
    rows += [response_row("unscored", 1, float("nan"))]
    d = difficulty(Dataset.from_list(rows))
    assert set(d) == {"low", "high", "mid-wide", "mid-narrow"}
    assert all(0 <= v <= 1 for v in d.values())
    assert d["low"] > d["mid-narrow"] > d["mid-wide"] > d["high"]


def test_difficulty_uses_the_latest_iteration_and_compares_within_one_rm():
    rows = [response_row("a", 1, -5.0), response_row("b", 1, 5.0)]
    # At iteration 2, "a" was sampled again and became the easy one; "b" was not resampled.
    rm_1 = "iter_1/m-step/rm"
    rows += [response_row("a", 2, 1.0, rm=rm_1), response_row("c", 2, 0.0, rm=rm_1)]
    # Another RM's scale is far off; its prompt is ranked only against its own round.
    rows += [response_row("d", 2, 900.0, rm="other"), response_row("e", 2, 1000.0, rm="other")]
    d = difficulty(Dataset.from_list(rows))
    assert d["a"] < d["c"]  # a's hard start at iteration 1 no longer counts
    assert d["b"] < 0.5  # still ranked against a's iteration-1 responses
    assert d["d"] > d["e"] and d["d"] == d["c"]


# --- retrospective prompt sampling ---------------------------------------------------------------

N_PAST = 40


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """Iteration 1: 40 policy prompts whose mean scores rise with their index, so their difficulty
    falls with it (equal margins); plus rm-split prompts that must never come back."""
    store = Store(tmp_path_factory.mktemp("run"))
    past = [prompt_row(f"past prompt {i}", 1) for i in range(N_PAST)]
    other_split = [prompt_row(f"rm prompt {i}", 1, split="rm") for i in range(5)]
    store.append("prompts", 1, past + other_split)
    store.append(
        "responses",
        1,
        [
            response_row(r["prompt_id"], 1, i + delta, j)
            for i, r in enumerate(past + other_split)
            for j, delta in enumerate([-0.5, 0.5])
        ],
    )
    fresh = [prompt_row(f"fresh prompt {i}", 2) for i in range(100)]
    return store, past, fresh


def test_sampling_picks_hard_prompts_in_proportion_to_difficulty(history):
    store, past, fresh = history
    hardness = difficulty(store.load("responses"))
    d = np.array([hardness[r["prompt_id"]] for r in past])
    index = {r["prompt_id"]: i for i, r in enumerate(past)}
    n_hard, seeds = 8, 200
    picks = np.zeros(N_PAST)
    for seed in range(seeds):
        for r in sample_prompts(fresh, store, 2, n=20, hard_fraction=0.4, seed=seed, easy_threshold=0.0):
            if r["prompt_id"] in index:
                picks[index[r["prompt_id"]]] += 1
    assert picks.sum() == n_hard * seeds
    # Each prompt's chance is n_hard * d / sum(d); compare picks in 4 difficulty bins (chi-square,
    # 3 degrees of freedom, critical value 16.27 at p = 0.001).
    expected = seeds * n_hard * d / d.sum()
    bins = np.argsort(-d).reshape(4, -1)
    observed_bins, expected_bins = picks[bins].sum(1), expected[bins].sum(1)
    chi2 = ((observed_bins - expected_bins) ** 2 / expected_bins).sum()
    assert chi2 < 16.27, (observed_bins, expected_bins)
    hardest, easiest = observed_bins[0], observed_bins[-1]
    assert hardest / easiest == pytest.approx(expected_bins[0] / expected_bins[-1], rel=0.25)
    assert hardest > 2 * easiest


def test_sampling_respects_the_mix_ratio_and_is_deterministic(history):
    store, past, fresh = history
    past_ids = {r["prompt_id"] for r in past}
    batch = sample_prompts(fresh, store, 2, n=20, hard_fraction=0.3, seed=7, easy_threshold=0.0)
    hard = [r for r in batch if r["prompt_id"] in past_ids]
    assert len(batch) == 20 and len(hard) == 6
    assert [r for r in batch if r["prompt_id"] not in past_ids] != fresh[:14]  # shuffled ...
    assert sorted(r["prompt"] for r in batch if r not in hard) == sorted(r["prompt"] for r in fresh[:14])
    assert batch == sample_prompts(fresh, store, 2, n=20, hard_fraction=0.3, seed=7, easy_threshold=0.0)
    assert batch != sample_prompts(fresh, store, 2, n=20, hard_fraction=0.3, seed=8, easy_threshold=0.0)
    assert all(r["split"] == "policy" for r in batch)
    # Nothing to look back on at the first iteration: all fresh.
    first = sample_prompts(fresh, store, 1, n=10, hard_fraction=0.5, seed=0, easy_threshold=0.0)
    assert len(first) == 10 and all(r in fresh for r in first)


def test_sampling_drops_easy_prompts_and_fills_shortfalls(history):
    store, past, fresh = history
    hardness = difficulty(store.load("responses"))
    hard_enough = {r["prompt_id"] for r in past if hardness[r["prompt_id"]] > 0.5}
    batch = sample_prompts(fresh, store, 2, n=60, hard_fraction=1.0, seed=0, easy_threshold=0.5)
    from_past = {r["prompt_id"] for r in batch} - {r["prompt_id"] for r in fresh}
    # Too few hard ones: all of them, fresh prompts fill the rest.
    assert from_past == hard_enough and len(batch) == 60
    # Too few fresh ones: hard ones fill the rest.
    batch = sample_prompts(fresh[:3], store, 2, n=20, hard_fraction=0.2, seed=0, easy_threshold=0.0)
    assert len(batch) == 20 and sum(r in fresh for r in batch) == 3
    # Both run out: a shorter batch.
    batch = sample_prompts(fresh[:3], store, 2, n=100, hard_fraction=0.5, seed=0, easy_threshold=0.0)
    assert len(batch) == 3 + N_PAST


# --- replay for the RM ---------------------------------------------------------------------------


def test_replay_mix_holds_proportions_and_looks_only_back(tmp_path):
    store = Store(tmp_path)
    store.append("pairs", 0, [pair_row(0, i, source="original") for i in range(200)])
    for k in (1, 2):
        store.append("pairs", k, [pair_row(k, 1000 * k + i, tag="e") for i in range(100)])
        store.append("pseudo_pairs", k, [pseudo_row(k, 1000 * k + i, kept=i % 4 != 0) for i in range(100)])
    current = Dataset.from_list([pair_row(3, 5000 + i, tag="now") for i in range(100)])
    proportions = {"current": 0.5, "pseudo_pairs": 0.3, "original": 0.2}

    mix = replay_mix(current, store, 3, proportions, seed=0, size=None)
    assert len(mix) == 200 and mix.features == FEATURES["pairs"]
    origin = [
        ("current" if it == 3 else "original" if src == "original" else "pseudo_pairs")
        for it, src in zip(mix["iteration"], mix["source"])
    ]
    assert {o: origin.count(o) for o in proportions} == {"current": 100, "pseudo_pairs": 60, "original": 40}
    assert len(set(mix["pair_id"])) == 200
    dropped = {r["pair_id"] for r in store.load("pseudo_pairs") if not r["kept"]}
    assert not dropped & set(mix["pair_id"])
    assert mix.to_list() == replay_mix(current, store, 3, proportions, seed=0, size=None).to_list()

    # At iteration 2 only iteration 1's 75 kept pseudo pairs can be replayed, 5 short of their half.
    mix = replay_mix(current, store, 2, {"current": 0.5, "pseudo_pairs": 0.5}, seed=1, size=160)
    assert len(mix) == 160 and mix["iteration"].count(1) == 75 and mix["iteration"].count(3) == 85


def test_replay_mix_hands_a_short_sources_rows_to_the_others(tmp_path):
    store = Store(tmp_path)
    current = Dataset.from_list([pair_row(1, i) for i in range(50)])
    mix = replay_mix(current, store, 1, {"current": 0.5, "pseudo_pairs": 0.5}, seed=0, size=None)
    assert len(mix) == 50 and sorted(mix["pair_id"]) == sorted(current["pair_id"])
    store.append("pseudo_pairs", 1, [pseudo_row(1, i) for i in range(10)])
    mix = replay_mix(current, store, 2, {"current": 0.6, "pseudo_pairs": 0.4}, seed=0, size=50)
    assert mix["iteration"].count(1) == 50  # "current" here is iteration 1 too
    assert sum(s == "m-step" for s in mix["source"]) == 10


# --- a killed writer ---------------------------------------------------------------------------

KILLED_WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import datasets
    sys.path.insert(0, {tests!r})
    from test_stores import pair_rows
    from coevolve.data.store import Store

    run, point = sys.argv[1], sys.argv[2]
    store = Store(run)
    store.append("pairs", 1, pair_rows(1))
    store.append("pairs", 2, pair_rows(2))

    def pause():
        Path(run, "PAUSED").touch()
        time.sleep(120)

    if point == "saving":  # the new iteration is on disk under its temporary name
        save = datasets.Dataset.save_to_disk
        datasets.Dataset.save_to_disk = lambda self, path, **kw: (save(self, path, **kw), pause())
        store.append("pairs", 3, pair_rows(3))
    else:  # replacing iteration 2: the old folder moved aside, the new one not yet in place
        rename = os.rename
        os.rename = lambda src, dst: (rename(src, dst), pause())
        store.append("pairs", 2, pair_rows(2, "re-run"))
""")


@pytest.mark.parametrize("point", ["saving", "replacing"])
def test_killed_writer_leaves_every_finished_iteration(tmp_path, point):
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER.format(tests=str(Path(__file__).parent)))
    run = tmp_path / "run"
    run.mkdir()
    child = subprocess.Popen(
        [sys.executable, str(script), str(run), point],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 50
    while not (run / "PAUSED").exists():
        assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()

    store = Store(run)
    assert store.iterations("pairs") == [1, 2]
    assert store.load("pairs").to_list() == pair_rows(1) + pair_rows(2)
    store.append("pairs", 3, pair_rows(3))  # the next writer cleans up after the killed one
    assert store.load("pairs", [3]).to_list() == pair_rows(3)
    assert sorted(p.name for p in (run / "stores" / "pairs").iterdir()) == ["iter_1", "iter_2", "iter_3"]


# --- export and summary ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_export_round_trips(tmp_path, fmt):
    store = Store(tmp_path)
    store.append("pairs", 1, pair_rows(1))
    store.append("pairs", 2, pair_rows(2))
    out = export(tmp_path, "pairs", fmt, tmp_path / "exports" / f"pairs.{fmt}")
    if fmt == "jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        columns = list(rows[0])
    else:
        table = pq.read_table(out)
        rows, columns = table.to_pylist(), table.column_names
    assert columns[:3] == ["prompt", "chosen", "rejected"]
    assert set(columns) == set(FEATURES["pairs"])
    assert rows == pair_rows(1) + pair_rows(2)


def test_export_keeps_unscored_responses_in_parquet(tmp_path):
    store = Store(tmp_path)
    rows = [response_row("p", 1, 0.5), response_row("p", 1, float("nan"), 1, rm="")]
    store.append("responses", 1, rows)
    back = pq.read_table(export(tmp_path, "responses", "parquet", tmp_path / "r.parquet")).to_pylist()
    assert back[0] == rows[0] and math.isnan(back[1]["score"])
    with pytest.raises(ValueError, match="format"):
        export(tmp_path, "responses", "csv", tmp_path / "r.csv")


def test_summary_counts_iterations_and_shows_difficulty(tmp_path):
    store = Store(tmp_path)
    store.append("pairs", 1, pair_rows(1))
    store.append("pairs", 2, pair_rows(2)[:1])
    store.append("pseudo_pairs", 2, [pseudo_row(2, 0), pseudo_row(2, 1, kept=False)])
    store.append("responses", 1, [response_row(f"p{i}", 1, float(i)) for i in range(4)])
    text = summary(tmp_path)
    assert "pairs: 4 rows" in text and "iter 1: 3  (e-step 3)" in text and "iter 2: 1" in text
    assert "pseudo_pairs: 2 rows" in text and "(1 kept)" in text
    assert "mean score 1.500" in text and "prompts: 0 rows" in text
    assert "4 prompts" in text and "0.9-1.0" in text
