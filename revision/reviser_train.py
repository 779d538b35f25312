"""Step `reviser-train` (iteration K >= 1, with steps.reviser): train SEFT's adaptive reviser.

examples  from preference pairs (prompt x, better y_h, weaker y_l): (x, y_l) -> y_h, and, so that good
          responses are left alone, (x, y_h) -> y_h for a share `reviser.identity_share` of the examples
          (column `kind`: revise | identity). Pairs: the original train pairs and, from iteration 2
          on, the RM-ranked E-step pairs of earlier iterations (the store's).
train     SFT with trl (loss on the target only) from policy_{K-1}, or from the previous iteration's
          reviser (`reviser.init_from`); the reviser sees (x, y) through revision/template.py
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import datasets
from coevolve.data.store import Store
from coevolve.revision.template import revision_prompt

from coevolve.core import rundir
from coevolve.core.step import StepRun
from coevolve.core.training import keep_log, save_trained, train_sft


def build_examples(step: StepRun, original: Path | None, tmp: Path) -> dict:
    cfg, k = step.cfg, step.iteration
    pairs = []
    if original is not None:
        train = datasets.load_from_disk(str(original)).filter(lambda r: r["split"] == "train")
        pairs += [{**r, "source": "original"} for r in train]
    earlier = Store(step.run_dir).load("pairs", list(range(1, k)))
    pairs += [r for r in earlier if r["source"] == "e-step"]
    if not pairs:
        raise RuntimeError(
            f"iteration {k} reviser-train: no preference pairs to learn revisions from (give data.pairs or data.task)"
        )

    def example(pair: dict, response: str, kind: str) -> dict:
        return {
            "prompt_id": pair["prompt_id"],
            "prompt": pair["prompt"],
            "response": response,
            "target": pair["chosen"],
            "kind": kind,
            "source": pair["source"],
        }

    share = cfg.reviser.identity_share
    # share / (1 - share) identity examples per revise example make them `share` of the whole set.
    identity = random.Random(cfg.seed + k).sample(pairs, round(len(pairs) * share / (1 - share)))
    rows = [example(p, p["rejected"], "revise") for p in pairs] + [
        example(p, p["chosen"], "identity") for p in identity
    ]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp))
    return {
        **{f"examples/{kind}": n for kind, n in Counter(r["kind"] for r in rows).items()},
        **{f"examples/from_{source}": n for source, n in Counter(p["source"] for p in pairs).items()},
    }


def train(step: StepRun, start: Path, examples: datasets.Dataset, tmp: Path) -> dict:
    cfg = step.cfg
    rows = [
        {"prompt": revision_prompt(cfg.reviser.template, e["prompt"], e["response"]), "completion": e["target"]}
        for e in examples
    ]
    trainer = train_sft(cfg, start, rows, cfg.reviser.train, tmp / "trainer")
    save_trained(trainer, tmp / "reviser")
    return keep_log(trainer, tmp / "train_log.jsonl", "reviser")


def main(step: StepRun) -> dict:
    cfg, k, run = step.cfg, step.iteration, step.run_dir
    here = (k, step.name)
    policy = step.inputs["policy"] = rundir.require_output(run, "policy", here)
    previous = rundir.latest_output(run, "reviser", here)
    start = step.inputs["start"] = previous if cfg.reviser.init_from == "previous" and previous is not None else policy
    original = rundir.latest_output(run, "pairs", iteration_max=0)
    if original is not None:
        step.inputs["pairs"] = original

    examples = step.phase("examples", lambda tmp: build_examples(step, original, tmp))
    step.phase("train", lambda tmp: train(step, start, datasets.load_from_disk(str(examples)), tmp))
    return step.finish({"reviser": "train/reviser", "examples": "examples"})
