"""The method's rules on hand-made numbers: E-step pair choice, M-step pseudo-pair filter, model selection,
RM accuracy."""

from __future__ import annotations

import math
import random
from statistics import pstdev
from types import SimpleNamespace

import datasets
import pytest
from coevolve.data.tasks import load_task
from coevolve.policy.e_step import pick_checkpoint
from coevolve.policy.pairs import best_vs_worst, length_controlled
from coevolve.reward.m_step import pseudo_pairs
from coevolve.reward.training import accuracy_phase

from coevolve.core.gold import write_gold_rm
from coevolve.core.scoring import win_rate


def test_length_control_picks_shortest_above_mean_and_lowest():
    texts = ["a long good answer", "short ok", "mid answer here", "bad"]
    scores = [0.9, 0.6, 0.7, 0.1]  # mean 0.575: responses 0, 1, 2 are above it
    lengths = [4, 2, 3, 1]
    assert length_controlled(texts, scores, lengths) == (1, 3)
    # The plain rule takes the best score whatever its length.
    assert best_vs_worst(texts, scores, lengths) == (0, 3)


def test_length_control_ties():
    texts = ["a b", "c d", "e", "f g h"]
    # Two shortest-above-mean candidates of equal length: the higher score wins.
    assert length_controlled(texts, [0.8, 0.9, 0.0, 0.1], [2, 2, 1, 3]) == (1, 2)
    # Equal lengths and scores: the first; two equally low rejected: the first.
    assert length_controlled(texts, [0.9, 0.9, 0.0, 0.0], [2, 2, 1, 3]) == (0, 2)
    # Best-vs-worst: equal best scores, the shorter wins.
    assert best_vs_worst(texts, [0.9, 0.9, 0.0, 0.1], [3, 2, 1, 3]) == (1, 2)


def test_equal_scores_or_identical_texts_give_no_pair():
    assert length_controlled(["a", "b", "c"], [0.5, 0.5, 0.5], [1, 1, 1]) == "all scores equal"
    assert best_vs_worst(["a", "b"], [0.2, 0.2], [1, 1]) == "all scores equal"
    assert (
        length_controlled(["same", "same", "x"], [0.9, 0.1, 0.5], [1, 1, 1])
        == "chosen and rejected texts are identical"
    )


def test_pseudo_pairs_drop_only_confidently_worse(tmp_path):
    old = [0.0, 1.0, 2.0, 3.0]  # population std = sqrt(1.25) = 1.1180
    new = [0.5, 0.0, 0.8, 3.2]  # deltas 0.5, -1.0, -1.2 (<= -1.118: dropped), 0.2 (identical texts)
    rows = datasets.Dataset.from_dict(
        {
            "prompt_id": list("abcd"),
            "prompt": ["p"] * 4,
            "new": ["n0", "n1", "n2", "same"],
            "old": ["o0", "o1", "o2", "same"],
            "new_score": new,
            "old_score": old,
        }
    )
    metrics = pseudo_pairs(rows, tmp_path)
    assert metrics["pseudo/epsilon"] == pytest.approx(pstdev(old)) == pytest.approx(1.1180, abs=1e-4)
    kept = datasets.load_from_disk(str(tmp_path / "kept"))
    dropped = datasets.load_from_disk(str(tmp_path / "dropped"))
    # b (delta -1.0) is slightly negative but within epsilon: kept, as regularisation.
    assert kept["prompt_id"] == ["a", "b"]
    assert kept["chosen"] == ["n0", "n1"] and kept["rejected"] == ["o0", "o1"]
    assert dict(zip(dropped["prompt_id"], dropped["reason"])) == {
        "c": "delta <= -epsilon (confidently worse)",
        "d": "identical responses",
    }
    assert metrics["pseudo/kept_negative_delta"] == 1
    assert "pseudo/gold_label_acc" not in metrics  # no gold reward given


def test_pseudo_pairs_without_the_epsilon_filter_keep_the_confidently_worse(tmp_path):
    # The paper's "without data filtering" ablation: only identical responses are dropped.
    rows = datasets.Dataset.from_dict(
        {
            "prompt_id": list("abc"),
            "prompt": ["p"] * 3,
            "new": ["n0", "n1", "same"],
            "old": ["o0", "o1", "same"],
            "new_score": [5.0, -9.0, 0.0],
            "old_score": [0.0, 0.0, 1.0],
        }
    )
    metrics = pseudo_pairs(rows, tmp_path, filtered=False)
    assert datasets.load_from_disk(str(tmp_path / "kept"))["prompt_id"] == ["a", "b"]
    assert metrics["pseudo/dropped_by_reason"] == {"identical responses": 1}


def test_pseudo_pairs_gold_agreement(tmp_path):
    # Gold = the response's length: a pseudo label is right when the new response is longer.
    rows = datasets.Dataset.from_dict(
        {
            "prompt_id": list("abcde"),
            "prompt": ["p"] * 5,
            "new": ["long", "x", "xx", "abc", "bigger"],
            "old": ["s", "yy", "zz", "abcd", "b"],
            "new_score": [1.0, 1.0, 1.0, 1.0, -9.0],
            "old_score": [0.0, 0.0, 0.0, 0.0, 0.0],
        }
    )
    metrics = pseudo_pairs(rows, tmp_path, gold=lambda prompt, response: float(len(response)))
    # Kept a, b, c, d: right on a, wrong on b and d, tied on c (left out): 1 of 3.
    assert metrics["pseudo/gold_label_acc"] == pytest.approx(1 / 3) and metrics["pseudo/gold_label_pairs"] == 3
    # e was dropped as confidently worse, but the gold says it was better: the filter was wrong once.
    assert metrics["pseudo/gold_label_acc_dropped"] == 1.0 and metrics["pseudo/gold_label_pairs_dropped"] == 1


def test_win_rate_counts_ties_half():
    assert win_rate([1, 2, 3, 4], [0, 2, 5, 1]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)


def test_rm_accuracy_of_each_set_from_one_pass(tmp_path):
    # The toy task's gold reward as the RM: a right answer beats "ok done" (gold 0), so a set's accuracy is
    # known exactly; the sets are scored together, and each must get back its own rows.
    task = load_task("toy")
    write_gold_rm(tmp_path / "rm", "toy")
    prompts = task.prompts(6, 0)
    good = [task.respond(p, frozenset(), random.Random(i)) for i, p in enumerate(prompts)]
    pairs = lambda chosen, rejected, rows: datasets.Dataset.from_dict(  # noqa: E731
        {
            "prompt": [prompts[i] for i in rows],
            "chosen": [chosen[i] for i in rows],
            "rejected": [rejected[i] for i in rows],
        }
    )
    bad = ["ok done"] * 6
    sets = {"right": pairs(good, bad, [0, 1, 2, 3]), "wrong": pairs(bad, good, [4, 5]), "empty": pairs(good, bad, [])}
    metrics = accuracy_phase(SimpleNamespace(cfg=None), tmp_path / "rm", sets, "rm")
    assert metrics["rm/accuracy_right"] == 1.0 and metrics["rm/accuracy_wrong"] == 0.0
    assert math.isnan(metrics["rm/accuracy_empty"])


def test_selection_picks_best_checkpoint_and_stops_under_tau():
    rows = [
        {"checkpoint": "checkpoint-2", "win_rate": 0.55},
        {"checkpoint": "checkpoint-4", "win_rate": 0.70},
        {"checkpoint": "checkpoint-6", "win_rate": 0.65},
    ]
    assert pick_checkpoint(rows, tau=0.6) == ("checkpoint-4", None)
    assert pick_checkpoint(rows, tau=0.75) == (
        "checkpoint-4",
        "the E-step's best checkpoint won 0.700 of the model-selection prompts, under tau=0.75",
    )
    # Equal win rates: the later (more trained) checkpoint.
    tied = [{"checkpoint": "checkpoint-10", "win_rate": 0.7}, {"checkpoint": "checkpoint-8", "win_rate": 0.7}]
    assert pick_checkpoint(tied, tau=0.6) == ("checkpoint-10", None)
