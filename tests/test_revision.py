"""The SEFT reviser (revision/) and the E-step modes that use it, on the prepared tiny run."""

from __future__ import annotations

import math
import shutil

import datasets
import pytest
import torch
from coevolve.data.store import Store
from coevolve.revision.revise import decide, threshold
from coevolve.revision.template import revision_prompt
from transformers import AutoModelForCausalLM, AutoTokenizer

from coevolve.cli import run_step
from coevolve.core import rundir
from coevolve.core.chat import completion_example
from coevolve.core.config import load_config
from coevolve.core.plan import iteration_steps, step_plan
from coevolve.core.rollout import score

# Small and fast: 20 prompts x 2 samples per iteration; the tiny models need larger learning rates.
REVISER = [
    "steps.reviser=true",
    "e_step.num_samples=2",
    "e_step.prompts_per_iteration=20",
    "e_step.save_steps=4",
    "m_step.prompts_per_iteration=10",
    "reviser.samples_per_prompt=2",
    "reviser.schedule=[0.5, 0.75]",
    "reviser.train={learning_rate: 3.0e-3, num_train_epochs: 1, per_device_train_batch_size: 32, max_length: 128, logging_steps: 2}",
    "e_step.sft={learning_rate: 1.0e-3, per_device_train_batch_size: 8, max_length: 64, logging_steps: 1}",
]


def done(run, k, step):
    return rundir.read_done(run, k, step)


def load(run, relative):
    return datasets.load_from_disk(str(run / relative))


@pytest.fixture(scope="module")
def revised_run(prepared_run, tmp_path_factory):
    """The prepared run plus iteration 1's reviser-train and revise, which every E-step mode shares."""
    run = tmp_path_factory.mktemp("revised") / "run"
    shutil.copytree(prepared_run, run)
    cfg = load_config(None, REVISER, run)
    for name in ("reviser-train", "revise"):
        run_step(name, run, 1, cfg)
    return run


def mean_target_logp(model_dir, asks: list[tuple[str, str]]) -> float:
    """Mean log-likelihood per token of each target given its user message, as SFT scores it."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, tokens = 0.0, 0
    for message, target in asks:
        row = completion_example(tok, message, target)
        head = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
        ids = torch.tensor(
            [tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=True)["input_ids"]]
        )
        with torch.no_grad():
            logps = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        total += float(logps[len(head) - 1 :].sum())
        tokens += ids.shape[1] - len(head)
    return total / tokens


def test_reviser_training_lowers_its_loss_on_revise_and_identity_examples(revised_run):
    run = revised_run
    cfg = load_config(None, REVISER, run)
    result = done(run, 1, "reviser-train")
    m = result["metrics"]
    assert m["reviser/loss_last"] < m["reviser/loss_first"] - 0.3

    examples = load(run, result["outputs"]["examples"])
    pairs = load(run, result["inputs"]["pairs"]).filter(lambda r: r["split"] == "train")
    revise = examples.filter(lambda r: r["kind"] == "revise")
    identity = examples.filter(lambda r: r["kind"] == "identity")
    # (x, y_l) -> y_h for every train pair, and (x, y_h) -> y_h for a third of all examples.
    assert sorted(zip(revise["prompt"], revise["response"], revise["target"])) == sorted(
        zip(pairs["prompt"], pairs["rejected"], pairs["chosen"])
    )
    assert len(identity) == m["examples/identity"] and len(identity) / len(examples) == pytest.approx(
        cfg.reviser.identity_share, abs=0.01
    )
    assert identity["response"] == identity["target"] and set(identity["target"]) <= set(pairs["chosen"])

    # The saved reviser, not only the logged batches, fits both kinds better than the policy it started from.
    start, reviser = run / result["inputs"]["start"], run / result["outputs"]["reviser"]
    assert result["inputs"]["start"] == result["inputs"]["policy"]
    for kind in (revise, identity):
        asks = [
            (revision_prompt(cfg.reviser.template, e["prompt"], e["response"]), e["target"])
            for e in kind.select(range(16))
        ]
        assert mean_target_logp(reviser, asks) > mean_target_logp(start, asks) + 0.1


def test_threshold_and_decision_on_hand_made_cases():
    assert threshold([0.4, 0.1, 0.3, 0.2], "quantile", 0.5) == pytest.approx(0.25)
    assert threshold([0.4, 0.1, 0.3, 0.2], "absolute", 0.35) == 0.35

    def row(name, flagged, original_score, revised, revised_score):
        return {
            "prompt_id": name,
            "prompt": f"prompt {name}",
            "original": f"original {name}",
            "original_score": original_score,
            "revised_flag": flagged,
            "revised": revised,
            "revised_score": revised_score,
        }

    rows = [
        row("better", True, 0.1, "revised better", 0.5),
        row("tie", True, 0.3, "revised tie", 0.3),
        row("worse", True, 0.4, "revised worse", 0.2),
        row("unchanged", True, 0.2, "original unchanged", 0.2 + 1e-7),
        row("good", False, 0.9, "", math.nan),
    ]
    revisions, sft, pairs = decide(rows)
    assert [r["kept"] for r in revisions] == [True, False, False, False, False]
    assert [(r["prompt_id"], r["completion"], r["source"]) for r in sft] == [
        ("better", "revised better", "revision"),
        ("good", "original good", "untouched"),
    ]
    assert [(p["chosen"], p["rejected"], p["chosen_score"], p["rejected_score"]) for p in pairs] == [
        ("revised better", "original better", 0.5, 0.1)
    ]


def test_revise_keeps_only_revisions_the_rm_scores_higher(revised_run):
    run = revised_run
    cfg = load_config(None, REVISER, run)
    result = done(run, 1, "revise")
    m, out = result["metrics"], result["outputs"]
    rows = load(run, out["revisions"])
    assert len(rows) == 20 * cfg.reviser.samples_per_prompt

    # Iteration 1's schedule value 0.5: the weaker half is revised, the rest left alone.
    flagged = rows.filter(lambda r: r["revised_flag"])
    assert m["revise/candidates"] == len(flagged) == len(rows) // 2
    assert (
        max(flagged["original_score"])
        < m["revise/threshold"]
        <= min(s for r, s in zip(rows["revised_flag"], rows["original_score"]) if not r)
    )

    for r in rows:
        improved = r["revised_flag"] and r["revised"] != r["original"] and r["revised_score"] > r["original_score"]
        assert r["kept"] == improved
    kept = rows.filter(lambda r: r["kept"])
    assert (
        0 < len(kept) < len(flagged)
        and m["revise/kept"] == len(kept)
        and m["revise/rejected"] == len(flagged) - len(kept)
    )
    # The recorded scores are the iteration's RM's own, re-scored here independently.
    rm = run / result["inputs"]["rm"]
    assert score(cfg, rm, list(kept["prompt"]), list(kept["revised"])) == pytest.approx(kept["revised_score"], abs=1e-5)

    sft, pairs = load(run, out["sft"]), load(run, out["pairs"])
    untouched = rows.filter(lambda r: not r["revised_flag"])
    assert sorted(sft["completion"]) == sorted(list(kept["revised"]) + list(untouched["original"]))
    assert pairs["chosen"] == kept["revised"] and pairs["rejected"] == kept["original"]
    assert all(c > r for c, r in zip(pairs["chosen_score"], pairs["rejected_score"]))
    stored = Store(run).load("revisions", [1])
    assert len(stored) == len(flagged) and sum(stored["kept"]) == len(kept)


@pytest.mark.parametrize("mode", ["seft", "dpo+seft"])
def test_seft_modes_run_two_iterations_and_train_on_the_revisions(revised_run, tmp_path, mode):
    run = tmp_path / "run"
    shutil.copytree(revised_run, run)
    # dpo+seft also checks a reviser continued from the previous iteration's; seft alone checks selection.
    extra = ["reviser.init_from=previous", "e_step.select=false"] if mode == "dpo+seft" else []
    cfg = load_config(None, REVISER + [f"e_step.mode={mode}"] + extra, run)
    assert iteration_steps(cfg, 1) == iteration_steps(cfg, 2) == ["reviser-train", "revise", "e-step", "m-step"]
    for k, name in step_plan(cfg):
        run_step(name, run, k, cfg)

    for k in (1, 2):
        e, revised = done(run, k, "e-step"), done(run, k, "revise")["outputs"]
        assert not e["stop"] and rundir.is_done(run, k, "m-step")
        if mode == "seft":
            # SFT on the revise step's set replaces sampling, pairs and DPO; selection still runs.
            assert set(e["timings"]) == {"train", "select"}
            assert e["inputs"]["sft"] == revised["sft"] and e["metrics"]["sft/rows"] == len(load(run, revised["sft"]))
            assert e["outputs"]["pairs"] == revised["pairs"]
            assert done(run, k, "m-step")["metrics"]["mix/e-step"] == len(load(run, revised["pairs"]))
        else:
            mix = load(run, e["outputs"]["train_pairs"])
            kept = load(run, revised["pairs"])
            assert (
                e["inputs"]["revision_pairs"] == revised["pairs"]
                and e["outputs"]["train_pairs"] == f"iter_{k}/e-step/mix"
            )
            from_revisions = mix.filter(lambda r: r["source"] == "revision")
            assert from_revisions["chosen"] == kept["chosen"] and from_revisions["rejected"] == kept["rejected"]
            assert len(mix) - len(from_revisions) == e["metrics"]["pairs/count"] and e["metrics"]["dpo/pairs"] == len(
                mix
            )
        assert sum(Store(run).load("revisions", [k])["kept"]) == done(run, k, "revise")["metrics"]["revise/kept"]

    second = done(run, 2, "reviser-train")
    if mode == "seft":
        assert (
            second["inputs"]["start"]
            == done(run, 2, "revise")["inputs"]["policy"]
            == done(run, 1, "e-step")["outputs"]["policy"]
        )
        # The selected policy fits its SFT set better than the policy it started from.
        e = done(run, 2, "e-step")
        sft = load(run, e["inputs"]["sft"])
        asks = list(zip(sft["prompt"], sft["completion"]))
        assert mean_target_logp(run / e["outputs"]["policy"], asks) > mean_target_logp(
            run / e["inputs"]["policy"], asks
        )
    else:
        # From iteration 2 on, the reviser also learns from the E-step's RM-ranked pairs.
        assert second["inputs"]["start"] == done(run, 1, "reviser-train")["outputs"]["reviser"]
        assert second["metrics"]["examples/from_e-step"] == done(run, 1, "e-step")["metrics"]["pairs/count"]
